"""INT8 training (clients.int8): layer gradients vs FP32, saved tensors, training, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.int8 import (
    Int8Config,
    Int8Conv2d,
    Int8Linear,
    export,
    exported_size_bytes,
    lac_penalty,
    prepare,
)
from clients.int8.functional import int8_conv2d, int8_linear
from clients.int8.quant import (
    hash_uniform,
    quantize_backward,
    quantize_forward,
    round_stochastic,
)
from clients.models import MLP, SmallCNN
from devices.errors import ConfigError

EAGER = Int8Config(compile=False, prc="none")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


CONV_CASES = [
    # (N, C, H, W), (O, C/g, kh, kw), stride, padding, dilation, groups
    ((4, 8, 9, 9), (12, 8, 3, 3), 1, 1, 1, 1),
    ((4, 8, 10, 11), (12, 8, 3, 3), 2, 1, 1, 1),
    ((4, 8, 10, 10), (12, 4, 3, 3), 1, 2, 2, 2),
    ((4, 16, 8, 8), (16, 1, 3, 3), 1, 1, 1, 16),
    ((4, 16, 9, 9), (16, 1, 3, 3), 2, 1, 1, 16),
    ((3, 6, 8, 8), (8, 6, 5, 5), 3, 2, 1, 1),
    ((4, 8, 6, 6), (8, 8, 1, 1), 1, 0, 1, 1),
]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gradients_match_fp32(case: tuple, per_channel: bool) -> None:
    xs, ws, s, p, d, g = case
    torch.manual_seed(0)
    cfg = Int8Config(compile=False, prc="none", per_channel=per_channel)
    x = torch.randn(xs, requires_grad=True)
    w = (torch.randn(ws) * 0.2).requires_grad_()
    b = torch.randn(ws[0], requires_grad=True)
    y_ref = F.conv2d(x, w, b, s, p, d, g)
    gy = torch.randn_like(y_ref)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, w, b), gy)
    y = int8_conv2d(x, w, b, cfg, (s, s), (p, p), (d, d), g)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < 0.05
    assert _rel(dx, dx_ref) < 0.05 and _cos(dx, dx_ref) > 0.995
    assert _rel(dw, dw_ref) < 0.05 and _cos(dw, dw_ref) > 0.995
    torch.testing.assert_close(db, db_ref)


@pytest.mark.parametrize("shape", [(64, 48, 40), (1, 1, 1), (17, 33, 7), (5, 3, 2, 9, 4)])
def test_linear_gradients_match_fp32(shape: tuple) -> None:
    torch.manual_seed(0)
    *lead, k, n = shape
    x = torch.randn(*lead, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    y_ref = F.linear(x, w, b)
    gy = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, (x, w, b), gy)
    y = int8_linear(x, w, b, EAGER)
    got = torch.autograd.grad(y, (x, w, b), gy)
    tol = 0.05 if x.numel() > 8 else 0.3  # a 1x1 product has one rounding error
    assert _rel(y, y_ref) < tol
    for a, r in zip(got[:2], ref[:2], strict=True):
        assert a.shape == r.shape
        assert _rel(a, r) < tol
    torch.testing.assert_close(got[2], ref[2])


@pytest.mark.parametrize("compile", [False, True])
def test_saved_tensors_are_int8(compile: bool) -> None:
    torch.manual_seed(0)
    model = prepare(SmallCNN(), compile=compile)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear | Int8Conv2d)]
    assert len(layers) == 4
    for m in layers:
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor, saved: list[torch.Tensor] = saved) -> torch.Tensor:
            saved.append(t)
            return t

        # Call each quantized layer alone so that only its own saved tensors are seen.
        if isinstance(m, Int8Conv2d):
            inp = torch.randn(8, m.in_channels, 8, 8, requires_grad=True)
        else:
            inp = torch.randn(8, m.in_features, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(inp)
        params = {p.data_ptr() for p in m.parameters()}
        codes = [t for t in saved if t.dtype in (torch.int8, torch.uint8)]
        others = [t for t in saved if t.dtype not in (torch.int8, torch.uint8)]
        assert len(codes) == 1 and codes[0].shape == inp.shape  # the input, as int8 codes
        for t in others:
            # Anything else is the weight parameter itself (no copy) or a scale.
            assert t.data_ptr() in params or t.numel() == 1, (t.dtype, t.shape)
        out.sum().backward()
        assert inp.grad is not None and m.weight.grad is not None


def test_hash_noise_is_uniform() -> None:
    x = torch.zeros(200_000)
    u = hash_uniform(x, torch.tensor(12345))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12**-0.5) < 0.005
    hist = torch.histc(u, 20, 0, 1) / u.numel()
    assert float((hist - 0.05).abs().max()) < 0.003
    u2 = hash_uniform(x, torch.tensor(12346))
    assert abs(float(torch.corrcoef(torch.stack([u, u2]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1])) < 0.01
    # Rounding with it is unbiased over seeds.
    v = torch.tensor([0.1, 0.5, -0.3, 2.75])
    acc = sum(round_stochastic(v, torch.tensor(s)) for s in range(4000))
    assert torch.allclose(acc / 4000, v, atol=0.03)


def test_stochastic_rounding_unbiased() -> None:
    torch.manual_seed(0)
    v = torch.tensor([0.1, 0.5, -0.3, 2.75, -1.9]).repeat(20000, 1)
    r = round_stochastic(v)
    assert torch.allclose(r.mean(0), v[0], atol=0.02)
    assert set(torch.unique(r[:, 0]).tolist()) == {0.0, 1.0}
    # Through quantize_forward: E[q * s] equals the input.
    x = torch.randn(64)
    acc = torch.zeros(64)
    for _ in range(2000):
        q, s = quantize_forward(x, stochastic=True)
        acc += q.float() * s
    assert (acc / 2000 - x).abs().max() < 0.1 * float(x.abs().max() / 127) + 1e-3


def test_prc_clips_range() -> None:
    g = torch.linspace(-1, 2, 1001)
    q, s = quantize_backward(g, prc="range")
    assert abs(float(s) - 0.95 * 2 / 127) < 1e-6
    assert int(q.min()) == round(-0.95 / float(s)) and int(q.max()) == 127
    g2 = torch.randn(10000)
    g2[0] = 100.0
    _, s_sigma = quantize_backward(g2, prc="sigma", z=2.5)
    _, s_none = quantize_backward(g2, prc="none")
    assert float(s_sigma) < 0.1 * float(s_none)


def _train(model: nn.Module, steps: int, sizes: list[int]) -> list[float]:
    torch.manual_seed(1)
    x = torch.randn(sum(sizes), 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        total, i = 0.0, 0
        for n in sizes:
            out = model(x[i : i + n])
            loss = F.cross_entropy(out, y[i : i + n]) + lac_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * n
            i += n
        losses.append(total / sum(sizes))
    return losses


def test_small_cnn_trains_with_varying_batches() -> None:
    torch.manual_seed(0)
    model = prepare(SmallCNN(), compile=False)
    losses = _train(model, 6, [32, 32, 32, 11])
    assert losses[-1] < 0.8 * losses[0], losses


def test_unsupported_layers_raise() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ConvTranspose2d(2, 2, 3), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"0 \(Conv1d\).*1 \(ConvTranspose2d\)"):
        prepare(model, compile=False)
    lstm = nn.ModuleDict({"rnn": nn.LSTM(4, 4), "head": nn.Linear(4, 2)})
    with pytest.raises(ConfigError, match="rnn"):
        prepare(lstm, compile=False)
    ok = prepare(model, leave_fp32=True, compile=False)
    assert type(ok[0]) is nn.Conv1d and type(ok[2]).__name__ == "Int8Linear"
    ok2 = prepare(model, leave_fp32=["0", "1", "2"], compile=False)
    assert type(ok2[2]) is nn.Linear
    with pytest.raises(ConfigError, match="leave_fp32"):
        prepare(model, leave_fp32=["nope"], compile=False)


def test_prepare_does_not_touch_original() -> None:
    m = MLP()
    p = prepare(m, compile=False)
    assert type(m.net[1]) is nn.Linear and type(p.net[1]).__name__ == "Int8Linear"
    assert prepare(m, inplace=True, compile=False) is m


def test_export_sizes() -> None:
    model = prepare(MLP(in_features=256, hidden=256), compile=False)
    fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    e = export(model)
    w_int = sum(t.numel() for k, t in e.items() if k.endswith("weight_int8"))
    assert w_int * 4 == fp32
    assert all(t.dtype == torch.int8 for k, t in e.items() if k.endswith("weight_int8"))
    total_fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if "lac" not in n)
    assert exported_size_bytes(e) < 0.27 * total_fp32
    # The codes reproduce the weights to within half a quantization step.
    w = model.net[1].weight
    recon = e["net.1.weight_int8"].float() * e["net.1.weight_scale"]
    assert (recon - w).abs().max() <= 0.51 * float(e["net.1.weight_scale"])


def test_compile_failure_falls_back_to_eager_with_one_warning() -> None:
    from clients.int8._compile import fused

    def breaks_graph(x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # data-dependent Python branch: no full graph
            return x * 2
        return x

    f = fused("test_breaks_graph", breaks_graph, True)
    x = torch.ones(4)
    with pytest.warns(RuntimeWarning, match="test_breaks_graph"):
        assert torch.equal(f(x), x * 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(f(x), x * 2)


def test_tracing_a_step_does_not_disable_compilation() -> None:
    # The cost model traces a step under a dispatch mode, where dynamo cannot run; that
    # trace must not switch the process's quantize functions to eager for training.
    import warnings

    from clients.int8._compile import _failed, compile_log, fused, resolve_compile
    from devices.cost import training_step_cost

    if not resolve_compile("auto"):
        pytest.skip("torch.compile unavailable here")
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    f = fused("test_trace_then_train", double, True)
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].register_forward_hook(lambda _m, _i, out: f(out))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        training_step_cost(model, (4,), 2)
    assert "test_trace_then_train" not in _failed
    x = torch.ones(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(f(x), x * 2)
    assert "test_trace_then_train" not in _failed
    assert "test_trace_then_train" in [name for name, _ in compile_log]  # it compiled


@pytest.mark.parametrize("enabled", [False, True])
def test_a_tracer_sees_a_quantize_call_as_one_kernel(enabled: bool) -> None:
    # The cost model counts the tensors an op touches: a quantize call must show it only
    # what one fused kernel reads and writes, never the eager version's temporaries
    # (int64 hash-noise arrays, several times the int8 output), compiled or not.
    from torch.utils._python_dispatch import TorchDispatchMode

    from clients.int8._compile import fused

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, list[torch.dtype]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, tuple | list) else (out,)
            self.ops.append((str(func), [t.dtype for t in outs if isinstance(t, torch.Tensor)]))
            return out

    def noisy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = (torch.arange(x.numel(), dtype=torch.int64) * 2654435761) % 1000
        q = (x * 10 + noise.to(x.dtype) / 1000).floor().clamp(-128, 127).to(torch.int8)
        return q, x.abs().max()

    f = fused(f"test_one_kernel_{enabled}", noisy, enabled)
    x = torch.randn(64)
    with Record() as rec:
        q, s = f(x)
    assert torch.equal(q, noisy(x)[0]) and torch.equal(s, noisy(x)[1])
    # it reads its input (an alias: a view, no new storage; the compiled path detaches
    # it first, another view) and writes its two outputs, nothing else
    ops = [op for op, _ in rec.ops if op != "aten.detach.default"]
    assert ops == ["aten.alias.default"] + ["aten.empty_strided.default"] * 2
    assert all(torch.int64 not in dtypes for _, dtypes in rec.ops)


def test_int8_step_memory_counts_no_eager_temporaries() -> None:
    # Compiled or eager, the traced INT8 step of the default fleet's model holds the same
    # bytes: the eager fallback's quantize temporaries are not the device's.
    from devices.cost import training_step_cost

    m = SmallCNN(width=8)
    eager = training_step_cost(prepare(m, compile=False), (1, 8, 8), 4, dtype="int8")
    auto = training_step_cost(prepare(m), (1, 8, 8), 4, dtype="int8")
    fp32 = training_step_cost(m, (1, 8, 8), 4)
    assert eager.peak_bytes == auto.peak_bytes
    # The working set at one op is no larger than FP32's: the int64 noise of an eager
    # quantize call (459 KB against FP32's 32 KB) and the int32 accumulator of the
    # classifier's dW (64 KB; a device's kernel rescales it tile by tile) are not counted.
    assert eager.transient_bytes <= fp32.transient_bytes
    # and the whole step within 2% of FP32's (LAC's parameters and int8 saved codes beside
    # the FP32 tensors that GroupNorm and ReLU save), so INT8 fits wherever FP32 does
    assert auto.peak_bytes <= 1.02 * fp32.peak_bytes


def test_eval_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    model = prepare(SmallCNN(), compile=False)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # stochastic rounding in training
        model.eval()
        assert torch.equal(model(x), model(x))


def test_lac_bias_and_penalty_gradients() -> None:
    from clients.int8.modules import _LACPenalty

    torch.manual_seed(0)
    lac = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    lac2 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_LACPenalty.apply, (lac, lac2))
    # The int8 layers' LAC gradient (computed inside their autograd function) matches
    # autograd of y = x W^T + b + alpha * mu + o.
    for conv in (False, True):
        x = torch.randn(6, 4, 5, 5) if conv else torch.randn(6, 4)
        w = torch.randn(3, 4, 3, 3) if conv else torch.randn(3, 4)
        b = torch.randn(3, requires_grad=True)
        lac3 = torch.randn(3, 3, requires_grad=True)
        if conv:
            y = int8_conv2d(x, w, b, EAGER, (1, 1), (1, 1), (1, 1), 1, lac3)
        else:
            y = int8_linear(x, w, b, EAGER, lac3)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (b, lac3), gy)
        shape = (1, 3, 1, 1) if conv else (1, 3)
        ref_y = (b + lac3[0] * lac3[1] + lac3[2]).view(shape) * torch.ones_like(y)
        ref = torch.autograd.grad(ref_y, (b, lac3), gy)
        for a, r in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r)
    model = prepare(MLP(), compile=False)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            assert m.lac is not None
            with torch.no_grad():
                m.lac[0], m.lac[1], m.lac[2] = 3.0, 0.5, -1.0
    n = sum(m.out_features for m in model.modules() if isinstance(m, Int8Linear))
    assert float(lac_penalty(model, weight=2.0).detach()) == pytest.approx(2.0 * n * 1.25)


# --- int8 weights (no FP32 master copy) and QAS --------------------------------------


def _on_grid(w: torch.Tensor) -> bool:
    s = w.detach().abs().amax() / 127
    q = w.detach() / s
    return bool(torch.allclose(q, q.round(), atol=1e-3)) and float(q.abs().max()) <= 127.001


def test_int8_weights_stay_on_their_grid_after_updates() -> None:
    torch.manual_seed(0)
    model = prepare(MLP(in_features=64, hidden=32, depth=1), weights="int8", compile=False)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(_on_grid(m.weight) for m in layers)  # projected at prepare
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert not all(_on_grid(m.weight) for m in layers)  # the step left the grid...
    state = model.state_dict()  # ...and what is read (sent to the server) is back on it
    assert all(_on_grid(state[f"{n}.weight"]) for n, m in model.named_modules()
               if isinstance(m, Int8Linear))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.state_dict()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # idempotent


def test_qas_restores_the_fp32_gradient_scale() -> None:
    # Without QAS an int8-weight device's step moves a weight by s_w**2 times FP32's;
    # QAS scales it back. Same model, input and (nearest) rounding: the two weight
    # gradients differ by exactly s_w**2, the bias gradients not at all.
    torch.manual_seed(0)
    base = MLP(in_features=64, hidden=32, depth=1)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    grads = {}
    for qas in (True, False):
        torch.manual_seed(1)  # the same projection of the weights onto their grid
        m = prepare(base, weights="int8", qas=qas, stochastic=False, lac=False, compile=False)
        F.cross_entropy(m(x), y).backward()
        grads[qas] = {n: p.grad.clone() for n, p in m.named_parameters()}
        weights = {n: p.detach() for n, p in m.named_parameters()}
    for n, g in grads[True].items():
        if n.endswith("weight"):
            s = weights[n].abs().amax() / 127
            assert torch.allclose(grads[False][n], g * s * s, rtol=1e-5, atol=0)
            assert float(s * s) < 1e-3  # the mismatch QAS fixes is large
        else:
            assert torch.equal(grads[False][n], g)


def test_int8_weights_learn_with_qas_and_stall_without() -> None:
    # Lin et al.'s finding, on digits: int8 weights trained with QAS learn as FP32 does;
    # without QAS the weights barely move and accuracy stays near chance.
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    x = torch.as_tensor(xs[:256] / 16.0, dtype=torch.float32)
    y = torch.as_tensor(ys[:256], dtype=torch.long)
    acc, moved = {}, {}
    for name in ("fp32", "qas", "no qas"):
        torch.manual_seed(0)
        m: nn.Module = MLP(in_features=64, hidden=32, depth=1)
        if name != "fp32":
            m = prepare(m, weights="int8", qas=name == "qas", compile=False)
        w0 = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("weight")}
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        for i in range(60):
            b = slice((i * 32) % 256, (i * 32) % 256 + 32)
            opt.zero_grad()
            F.cross_entropy(m(x[b]), y[b]).backward()
            opt.step()
        m.state_dict()  # project the last update
        moved[name] = sum(float((p.detach() - w0[n]).norm())
                          for n, p in m.named_parameters() if n in w0)
        m.eval()
        with torch.no_grad():
            acc[name] = float((m(x).argmax(1) == y).float().mean())
    assert acc["fp32"] > 0.85, acc
    assert acc["qas"] >= acc["fp32"] - 0.05, acc
    assert acc["no qas"] < 0.3, acc
    assert moved["no qas"] < 0.1 * moved["qas"], moved


def test_int8_weights_count_one_byte_each_in_the_cost_model() -> None:
    from devices.cost import training_step_cost

    base = SmallCNN(width=8)
    fp32_master = training_step_cost(prepare(base), (1, 8, 8), 4, dtype="int8")
    int8_w = training_step_cost(prepare(base, weights="int8"), (1, 8, 8), 4, dtype="int8")
    n_w = sum(m.weight.numel() for m in prepare(base).modules()
              if isinstance(m, Int8Linear | Int8Conv2d))
    assert fp32_master.weight_bytes - int8_w.weight_bytes == 3 * n_w
    assert int8_w.grad_bytes == fp32_master.grad_bytes  # gradients stay FP32
    assert int8_w.peak_bytes == fp32_master.peak_bytes - 3 * n_w


def test_weights_and_qas_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="int8.weights"):
        prepare(SmallCNN(), weights="int4")
    with pytest.raises(ConfigError, match="int8.qas"):
        prepare(SmallCNN(), weights="fp32", qas=True)
    assert prepare(SmallCNN(), weights="int8").features[0].cfg.qas  # on by default there


@pytest.mark.parametrize("compile_", [False, True])
def test_sparse_update_after_int8_convs_trains_a_group_norm(compile_: bool) -> None:
    # A frozen int8 conv (channels-last FP32 output) feeding a GroupNorm whose bias
    # trains: torch's CPU GroupNorm backward crashed the process on that input, which
    # is what every sparse update of SmallCNN past its second conv does.
    m = prepare(SmallCNN(width=12), compile=compile_)
    names = [n for n, _ in m.named_parameters()]
    first = names.index("features.4.bias")
    for i, (_, p) in enumerate(m.named_parameters()):
        p.requires_grad_(i >= first)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    F.cross_entropy(m(x), y).backward()
    assert m.features[4].bias.grad is not None and m.features[3].weight.grad is None


def test_mcu_int8_config_trains_on_mcus_only_with_int8_weights() -> None:
    # configs/mcu-int8.toml's claim, as each device plans its step: an STM32F746 cannot
    # hold the full FP32 step (nor INT8 with FP32 master weights), but can with int8
    # weights; the nRF52840 then trains a sparse update.
    from clients.client_app import _plan
    from devices.cost import ram_needed_bytes
    from devices.errors import BudgetError
    from devices.profiles import load_profile
    from sim.config import load_config

    cfg = load_config("configs/mcu-int8.toml")
    stm, nrf = load_profile("stm32f746"), load_profile("nrf52840")
    batch = cfg.client.train.batch_size

    def plan(**over: object) -> tuple[object, int]:
        spec = cfg.with_overrides(**{f"train.{k}": v for k, v in over.items()}).client
        trainable, cost, _ = _plan(spec, stm, batch)
        return trainable, ram_needed_bytes(cost, stm)

    for precision, weights in (("fp32", False), ("int8", False)):
        with pytest.raises(BudgetError, match="stm32f746: one training step needs"):
            plan(precision=precision, int8_weights=weights, on_budget="fail")
    trainable, peak = plan(on_budget="fail")  # the config: int8 weights + QAS
    assert trainable is None and peak <= stm.ram_bytes  # the full update fits
    spec = cfg.client
    trainable, cost, _ = _plan(spec, nrf, batch)
    assert trainable is not None and ram_needed_bytes(cost, nrf) <= nrf.ram_bytes  # sparse
    # the sparse INT8 step's work is the FP32 graph's for the same layers (the int8
    # kernels are invisible to the flop counter; a plan without MACs would cost nothing)
    fp32 = cfg.with_overrides(**{"train.precision": "fp32"}).client
    _, fp32_cost, _ = _plan(fp32, nrf, batch)
    assert cost.macs == fp32_cost.macs > 0


def test_int8_weight_model_pickles_and_keeps_its_grid() -> None:
    import io

    torch.manual_seed(0)
    m = prepare(SmallCNN(), weights="int8", compile=False)
    F.cross_entropy(m(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    buf = io.BytesIO()
    torch.save(m, buf)  # whole-module pickling (no unpicklable state on the layers)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    state = loaded.state_dict()  # the loaded copy still projects before a read
    assert all(_on_grid(state[f"{n}.weight"]) for n, mod in loaded.named_modules()
               if isinstance(mod, Int8Linear | Int8Conv2d))
