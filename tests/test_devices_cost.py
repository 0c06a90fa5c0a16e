"""The cost model: MACs against published figures and torch's own counter, memory against
what autograd saves, the cache, budget checks, sparse plans and the roofline."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clients.models import MLP, MobileNetV2, ResNet18, SmallCNN
from devices import (
    BudgetError,
    ConfigError,
    DeviceProfile,
    ProfileError,
    check_fit,
    clear_cost_cache,
    comm_energy_j,
    comm_time_s,
    cost_cache_info,
    describe_cost,
    estimate_training,
    format_bytes,
    idle_energy_j,
    inference_cost,
    load_profile,
    plan_sparse_update,
    ram_needed_bytes,
    step_energy_j,
    step_time_s,
    training_step_cost,
)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cost_cache()
    yield
    clear_cost_cache()


@pytest.fixture(scope="module")
def mbv2() -> nn.Module:
    return MobileNetV2(1.0)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return ResNet18()


def _torch_counts(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """Forward and backward MACs by torch's own FlopCounterMode (FLOPs / 2), on meta."""
    m = copy.deepcopy(model).to("meta")
    x = torch.randn(shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = m(x)
        fwd = counter.get_total_flops()
        out.sum().backward()
    return fwd // 2, (counter.get_total_flops() - fwd) // 2


def test_published_forward_macs(mbv2: nn.Module, resnet18: nn.Module) -> None:
    mb = training_step_cost(mbv2, (3, 224, 224), 1)
    rn = training_step_cost(resnet18, (3, 224, 224), 1)
    # MobileNetV2-1.0: ~300 M MACs (Sandler et al. 2018); ResNet-18: ~1.8 G (He et al.)
    assert mb.fwd_macs == pytest.approx(300e6, rel=0.02)
    assert rn.fwd_macs == pytest.approx(1.814e9, rel=0.02)
    assert mb.fwd_macs == _torch_counts(mbv2, (1, 3, 224, 224))[0]
    assert mb.param_count == sum(p.numel() for p in mbv2.parameters())


def test_backward_is_twice_forward_when_everything_trains(
    mbv2: nn.Module, resnet18: nn.Module
) -> None:
    for model in (mbv2, resnet18):
        cost = training_step_cost(model, (3, 224, 224), 1)
        # dX + dW per layer, minus the first layer's dX (the input needs no gradient)
        assert 1.85 < cost.bwd_macs / cost.fwd_macs < 2.0
        # per layer, on the right layer even across residual branches: dX + dW = 2x the
        # forward for every conv/linear except the first (dW only); no MACs elsewhere
        first, *rest = [layer for layer in cost.layers if layer.fwd_macs]
        assert first.bwd_macs == first.fwd_macs
        assert all(layer.bwd_macs == 2 * layer.fwd_macs for layer in rest)
        assert all(layer.bwd_macs == 0 for layer in cost.layers if not layer.fwd_macs)
    # ResNet-18 has no grouped convolutions: torch's own counter must agree exactly
    rn = training_step_cost(resnet18, (3, 224, 224), 1)
    assert rn.bwd_macs == _torch_counts(resnet18, (1, 3, 224, 224))[1]


def test_depthwise_weight_gradient_is_not_counted_as_dense() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    cost = training_step_cost(model, (3, 10, 10), 2)
    dw = next(layer for layer in cost.layers if layer.name == "1")
    assert dw.depthwise
    assert dw.fwd_macs == 2 * 8 * 10 * 10 * 9
    assert dw.bwd_macs == 2 * dw.fwd_macs  # dX + dW, each as many MACs as the forward
    first = next(layer for layer in cost.layers if layer.name == "0")
    assert first.bwd_macs == first.fwd_macs  # dW only: the input needs no gradient


def test_frozen_prefix_needs_no_dx_and_no_saved_activations(resnet18: nn.Module) -> None:
    full = training_step_cost(resnet18, (3, 224, 224), 2)
    head = training_step_cost(resnet18, (3, 224, 224), 2, trainable=["fc.weight", "fc.bias"])
    assert head.bwd_macs == 2 * 512 * 1000  # the classifier's dW, nothing else
    assert head.trainable_param_count == 512 * 1000 + 1000
    assert head.grad_bytes == 4 * head.trainable_param_count
    assert head.activation_bytes < full.activation_bytes / 1000
    assert all(layer.bwd_macs == 0 for layer in head.layers if layer.name != "fc")
    last_block = [n for n, _ in resnet18.named_parameters() if n.startswith(("layers.7", "fc"))]
    part = training_step_cost(resnet18, (3, 224, 224), 2, trainable=last_block)
    assert head.bwd_macs < part.bwd_macs < full.bwd_macs
    assert head.peak_bytes < part.peak_bytes < full.peak_bytes


def test_saved_activations_of_a_hand_model() -> None:
    """Linear(16, 32) + ReLU + Linear(32, 4), batch 8, FP32: autograd saves the input x
    (for dW of the first layer) and the ReLU output (for ReLU's backward, and the same
    storage again as the second layer's input); weights it saves are weights. The loss
    saves log_softmax's output, the int64 targets and a scalar total weight."""
    batch, d_in, hidden, classes = 8, 16, 32, 4
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    cost = training_step_cost(model, (d_in,), batch)
    saved = {layer.name: layer.saved_bytes for layer in cost.layers}
    assert saved["0"] == batch * d_in * 4
    assert saved["1"] == batch * hidden * 4
    assert saved["2"] == 0
    assert saved["(loss)"] == batch * classes * 4 + batch * 8 + 4
    assert cost.activation_bytes == sum(saved.values())
    n_params = sum(p.numel() for p in model.parameters())
    assert cost.weight_bytes == cost.grad_bytes == 4 * n_params
    assert cost.fwd_macs == batch * (d_in * hidden + hidden * classes)
    assert cost.peak_bytes == (cost.weight_bytes + cost.grad_bytes + cost.optimizer_bytes
                               + cost.activation_bytes + cost.transient_bytes)
    # the largest live working set: ReLU's backward reads grad_out, writes grad_in
    assert cost.transient_bytes == 2 * batch * hidden * 4
    # only the second layer trains: its input is saved, x is not
    second = training_step_cost(model, (d_in,), batch, trainable=["2.weight", "2.bias"])
    saved = {layer.name: layer.saved_bytes for layer in second.layers}
    assert saved["0"] == saved["1"] == 0 and saved["2"] == batch * hidden * 4
    assert second.bwd_macs == batch * hidden * classes
    adam = training_step_cost(model, (d_in,), batch, optimizer="adam")
    sgdm = training_step_cost(model, (d_in,), batch, momentum=0.9)
    assert adam.optimizer_bytes == 2 * cost.grad_bytes
    assert sgdm.optimizer_bytes == cost.grad_bytes
    assert cost.optimizer_bytes == 0


class _SaveInt8(torch.autograd.Function):
    """y = 2x, saving an int8 copy of x for backward (as an INT8 training layer does)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(torch.clamp(x * 10, -127, 127).to(torch.int8))
        return 2 * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (q,) = ctx.saved_tensors
        return grad * 2 + 0 * q.float()


class _Int8Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_SaveInt8.apply(self.fc1(x)))


class _NeedsCpu(nn.Module):
    """Calls ``.item()`` in forward, which the meta device cannot do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x / max(x.abs().max().item(), 1.0))


def test_int8_saved_tensors_count_one_byte_per_element() -> None:
    cost = training_step_cost(_Int8Model(), (64,), 4)
    layer = next(layer for layer in cost.layers if layer.name == "(model)")
    assert layer.saved_bytes == 4 * 64 * 1  # int8, not 4 bytes per element


def test_falls_back_to_cpu_when_meta_cannot_run() -> None:
    cost = training_step_cost(_NeedsCpu(), (64,), 4)
    assert cost.measured_on == "cpu"
    assert cost.fwd_macs == 4 * 64 * 10
    assert training_step_cost(MLP(64, 32, 1), (64,), 4).measured_on == "meta"


def test_second_call_is_a_cache_hit_and_keys_are_precise() -> None:
    model = SmallCNN()
    first = training_step_cost(model, (1, 8, 8), 16)
    assert cost_cache_info()["misses"] == 1 and cost_cache_info()["hits"] == 0
    again = training_step_cost(SmallCNN(), (1, 8, 8), 16)  # same architecture, new weights
    assert again is first and cost_cache_info()["hits"] == 1
    training_step_cost(model, (1, 8, 8), 32)
    training_step_cost(model, (1, 8, 8), 16, optimizer="adam")
    training_step_cost(model, (1, 8, 8), 16, dtype="int8")
    dict(model.named_parameters())["features.0.weight"].requires_grad_(False)
    frozen = training_step_cost(model, (1, 8, 8), 16)
    assert frozen.trainable_param_count < first.trainable_param_count
    assert cost_cache_info()["misses"] == 5
    training_step_cost(SmallCNN(width=8), (1, 8, 8), 16)
    assert cost_cache_info()["misses"] == 6


def test_measuring_leaves_the_model_untouched() -> None:
    model = MobileNetV2(0.35, num_classes=10)
    stem = dict(model.named_parameters())["features.0.0.weight"]
    stem.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training_step_cost(model, (3, 32, 32), 2)
    assert not stem.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_inference_cost_is_forward_only() -> None:
    model = SmallCNN()
    train = training_step_cost(model, (1, 8, 8), 4)
    infer = inference_cost(model, (1, 8, 8), 4)
    assert infer.kind == "inference"
    assert infer.fwd_macs == train.fwd_macs and infer.bwd_macs == 0
    assert infer.grad_bytes == infer.activation_bytes == infer.update_bytes == 0
    assert infer.frozen_weight_bytes == infer.weight_bytes
    assert infer.peak_bytes == infer.weight_bytes + infer.transient_bytes


def test_check_fit_refuses_full_fp32_update_of_mobilenetv2_035_on_stm32() -> None:
    stm = load_profile("stm32f746")
    cost = training_step_cost(MobileNetV2(0.35), (3, 128, 128), 1)
    with pytest.raises(BudgetError) as err:
        check_fit(cost, stm)
    message = str(err.value)
    need = format_bytes(ram_needed_bytes(cost, stm))
    assert message.startswith(f"stm32f746: one training step needs {need} of RAM; "
                              f"the device has 320 KB")
    assert "of storage; the device has 1 MB" in message  # FP32 weights exceed the Flash too
    check_fit(cost, load_profile("jetson-nano"))  # fits a 4 GB device


def test_frozen_weights_stay_in_flash_on_an_mcu() -> None:
    model = SmallCNN()
    head = ["classifier.3.weight", "classifier.3.bias"]
    cost = training_step_cost(model, (1, 8, 8), 1, trainable=head)
    stm, rpi = load_profile("stm32f746"), load_profile("rpi4")
    assert ram_needed_bytes(cost, rpi) == cost.peak_bytes
    assert ram_needed_bytes(cost, stm) == cost.peak_bytes - cost.frozen_weight_bytes
    trainable_bytes = 4 * (64 * 10 + 10)
    assert cost.frozen_weight_bytes == cost.weight_bytes - trainable_bytes


def test_sparse_plan_fits_where_the_full_update_does_not() -> None:
    model = MobileNetV2(0.35, num_classes=10)
    stm = load_profile("stm32f746")
    device = dataclasses.replace(stm, name="stm32-4mb", ram_bytes=4 * 1024**2,
                                 storage_bytes=16 * 1024**2)
    plan = plan_sparse_update(model, (3, 128, 128), 1, device)
    assert not plan.full
    assert plan.ram_needed_bytes <= device.ram_bytes < ram_needed_bytes(plan.full_cost, device)
    check_fit(plan.cost, device)
    assert {"classifier.1.weight", "classifier.1.bias"} <= set(plan.trainable)
    assert plan.bias_layers >= 1 and plan.weight_layers >= 1
    assert plan.cost.bwd_macs < plan.full_cost.bwd_macs
    assert "stm32-4mb: sparse update trains" in plan.summary
    # the full update fits a Jetson Nano: the plan says so and trains everything
    full = plan_sparse_update(model, (3, 128, 128), 1, load_profile("jetson-nano"))
    assert full.full and full.cost.trainable_param_count == full.cost.param_count


def test_sparse_plan_raises_with_the_minimum_when_nothing_fits() -> None:
    model = MobileNetV2(0.35, num_classes=10)
    stm = load_profile("stm32f746")
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(BudgetError) as err:  # FP32: even the frozen forward needs > 320 KB
        plan_sparse_update(model, (3, 128, 128), 1, stm, weight_storage_bytes=n_params)
    message = str(err.value)
    assert message.startswith("stm32f746: no sparse update fits 320 KB of RAM: training only "
                              "the bias of 'classifier.1' needs ")
    assert "largest live working set" in message
    with pytest.raises(BudgetError, match="of storage; the device has 1 MB; no sparse"):
        plan_sparse_update(model, (3, 128, 128), 1, stm)  # FP32 weights: 1.6 MB of Flash


def test_roofline_depthwise_is_memory_bound_and_dense_conv_compute_bound() -> None:
    nano = load_profile("jetson-nano")
    cost = training_step_cost(MobileNetV2(1.0), (3, 224, 224), 1)
    rate, bw = nano.macs_per_s["fp32"], nano.mem_bandwidth_bytes_per_s
    depthwise = [layer for layer in cost.layers if layer.depthwise]
    assert depthwise
    assert all(layer.fwd_bytes / bw > layer.fwd_macs / rate for layer in depthwise)
    rn = training_step_cost(ResNet18(), (3, 224, 224), 1)
    conv = next(layer for layer in rn.layers if layer.name == "layers.2.conv2")
    assert conv.fwd_macs / rate > conv.fwd_bytes / bw
    # the roofline is never faster than pure compute or pure traffic
    t = step_time_s(cost, nano)
    assert t >= cost.macs / rate
    assert t >= sum(layer.fwd_bytes + layer.bwd_bytes for layer in cost.layers) / bw
    times = [step_time_s(cost, load_profile(n)) for n in ("jetson-orin-nano", "rpi4",
                                                          "stm32f746")]
    assert times == sorted(times)
    assert step_energy_j(cost, nano) == pytest.approx(t * nano.power_compute_w)
    int8 = training_step_cost(MobileNetV2(1.0), (3, 224, 224), 1, dtype="int8")
    assert step_time_s(int8, load_profile("stm32f746")) < step_time_s(
        cost, load_profile("stm32f746"))


def _link(**over: Any) -> DeviceProfile:
    return dataclasses.replace(load_profile("nrf52840"), uplink_bytes_per_s=1000.0,
                               downlink_bytes_per_s=4000.0, latency_s=0.5,
                               power_radio_w=2.0, power_idle_w=0.25, **over)


def test_comm_and_idle_energy() -> None:
    dev = _link()
    assert comm_time_s(dev, 2000, 8000) == pytest.approx(0.5 + 2.0 + 0.5 + 2.0)
    assert comm_time_s(dev, 2000, 0) == pytest.approx(2.5)
    assert comm_time_s(dev, 0, 0) == 0.0
    assert comm_energy_j(dev, 2000, 8000) == pytest.approx(2.0 * 5.0)
    assert idle_energy_j(dev, 8.0) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="bytes_up"):
        comm_time_s(dev, -1, 0)


def test_estimate_training_scales_with_steps() -> None:
    cost = training_step_cost(SmallCNN(), (1, 8, 8), 8)
    rpi = load_profile("rpi4")
    est = estimate_training(cost, rpi, 10)
    assert est.compute_s == pytest.approx(10 * step_time_s(cost, rpi))
    assert est.energy_j == pytest.approx(est.compute_s * rpi.power_compute_w)
    assert est.macs == 10 * cost.macs and est.steps == 10
    assert est.peak_mem_bytes == ram_needed_bytes(cost, rpi)


def test_bad_arguments_are_refused() -> None:
    model = SmallCNN()
    with pytest.raises(ConfigError, match="batch_size"):
        training_step_cost(model, (1, 8, 8), 0)
    with pytest.raises(ConfigError, match="input_shape"):
        training_step_cost(model, (1, -8, 8), 1)
    with pytest.raises(ConfigError, match="unknown parameter names"):
        training_step_cost(model, (1, 8, 8), 1, trainable=["nope.weight"])
    with pytest.raises(ConfigError, match="optimizer"):
        training_step_cost(model, (1, 8, 8), 1, optimizer="lion")
    with pytest.raises(ConfigError, match="num_classes"):
        training_step_cost(model, (1, 8, 8), 1, num_classes=7)
    with pytest.raises(ConfigError, match="cannot run a step"):
        training_step_cost(model, (3, 8, 8), 1)
    with pytest.raises(ConfigError, match="cannot run a step"):  # BN needs > 1 value
        training_step_cost(ResNet18(num_classes=10), (3, 32, 32), 1)
    cost = training_step_cost(model, (1, 8, 8), 1, dtype="fp16")
    with pytest.raises(ProfileError, match="no throughput for dtype 'fp16'"):
        step_time_s(cost, load_profile("rpi4"))


class _Scaled(nn.Module):
    """A custom layer whose configuration is a plain attribute, not in its repr."""

    def __init__(self, repeat: int) -> None:
        super().__init__()
        self.repeat = repeat
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeat):
            x = self.fc(x)
        return x


def test_cache_key_sees_plain_module_attributes() -> None:
    once = training_step_cost(_Scaled(1), (16,), 2)
    twice = training_step_cost(_Scaled(2), (16,), 2)
    assert twice.fwd_macs == 2 * once.fwd_macs


def test_describe_cost_names_the_terms_and_ranks_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1,
                                                                   groups=8))
    cost = training_step_cost(model, (3, 32, 32), 4)
    nano = load_profile("jetson-nano")
    text = describe_cost(cost, nano, top=3)
    assert f"peak {format_bytes(cost.peak_bytes)}" in text
    assert "on jetson-nano:" in text
    rows = {row.split()[0]: row for row in text.splitlines()[3:]}
    assert set(rows) == {"0", "1", "(loss)"}
    assert rows["1"].endswith("mem") and not rows["0"].endswith("mem")  # depthwise vs dense
    assert "M MACs" in describe_cost(cost)


def test_meta_and_cpu_measurements_agree() -> None:
    from devices import _trace

    model = MobileNetV2(0.35, num_classes=10)
    names = [n for n, _ in model.named_parameters()][-6:]
    runs = [_trace._run(model, (2, 3, 32, 32), names, None, True, device)
            for device in ("meta", "cpu")]
    meta, cpu = ([(op.layer, op.phase, op.macs) for op in run.ops] for run in runs)
    assert meta == cpu
    assert sorted(runs[0].saved.values()) == sorted(runs[1].saved.values())
    # the meta kernel of BN backward materializes gradients it was not asked for (a few
    # hundred bytes here); everything else moves the same bytes
    meta_bytes, cpu_bytes = (sum(op.bytes for op in run.ops) for run in runs)
    assert meta_bytes == pytest.approx(cpu_bytes, rel=1e-3)
