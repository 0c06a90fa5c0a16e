"""Benchmark of INT8 training (clients.int8) against FP32 and fake-quant QAT, side by side.

For each model and batch size, one training step (forward, backward, SGD-with-momentum
step) is timed for three variants built from the same initial weights:

- ``fp32``: the model as it is, eager;
- ``qat``: ``torch.ao.quantization.prepare_qat`` with the default QAT qconfig for x86
  (fake quantization: FP32 arithmetic with quantize-dequantize; the usual baseline);
- ``int8``: ``clients.int8.prepare`` with its defaults (PRC and LAC on, stochastic
  rounding, quantize ops fused with ``torch.compile`` where available);
- ``int8w``: the same with int8 weights and QAS (``prepare(weights="int8")``).

Models: (a) ``small_cnn``: ``clients.models.SmallCNN`` on 8x8 digits-shaped input;
(b) ``mlp2048``: an MLP 1536-2048-2048-16; (c) ``cnn128``: three 3x3 convolutions with 128
channels on 16x16 input (defined here), average pool and a linear head.

Timing: the variants are interleaved (A B C A B C ...) over ``--rounds`` rounds of
``--steps`` steps each, after ``--warmup`` steps (the first int8 step compiles; its time is
reported separately as ``first_step_s``). A step's time is the process CPU time per step
(with ``--threads 1`` this is what one core does, little changed by other processes on a
shared machine); the wall-clock median is reported beside it. Ratios are medians of
``fp32 / int8`` and ``qat / int8`` CPU times over the rounds.

Memory: ``saved`` counts, with ``torch.autograd.graph.saved_tensors_hooks``, the bytes the
converted layers (nn.Linear / nn.Conv2d and their QAT or INT8 replacements) save for
backward during one forward, counting each storage once and not counting tensors that are
the parameters themselves (they exist anyway). ``peak`` is the whole step's peak memory as
the fleet's cost model counts it (``devices.cost.training_step_cost``: weights as a
device stores them, gradients, momentum buffers, saved activations and the largest working
set at one op, each int8 GEMM/convolution with its rescale counted as one kernel). The
converted layers save 4x fewer bytes, but with FP32 master weights the whole step's peak
barely moves: the ReLU (and a norm) after a conv/linear layer keeps its FP32 tensors beside
the layer's int8 codes, and in FP32 those are the very tensors the next layer saves.
``int8w`` (``prepare(weights="int8")``: weights on their int8 grid, no FP32 master copy,
QAS) is timed too; its weights count one byte each, which is where the peak falls.

``--kernels`` also times the conv weight-gradient kernels (shifted int8 GEMMs, oneDNN int8
conv with batch and channels swapped, im2col + ``_int_mm``, FP32) at the benchmark shapes.

Writes ``bench/out/int8.json`` and prints a table. Run:
``.venv/bin/python bench/int8.py`` (a few minutes on 2 shared cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clients.int8 import Int8Conv2d, Int8Linear, lac_penalty, prepare
from clients.int8._compile import compile_log
from clients.models import SmallCNN
from devices.cost import training_step_cost

OUT = Path(__file__).resolve().parent / "out" / "int8.json"
VARIANTS = ["fp32", "qat", "int8", "int8w"]


class CNN128(nn.Module):
    """Three 3x3 convolutions at 128 channels (16 input channels), pool, linear head."""

    def __init__(self, in_channels: int = 16, width: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp2048() -> nn.Module:
    """The MLP 1536-2048-2048-16 of the methods notes."""
    return nn.Sequential(
        nn.Linear(1536, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 16)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, list[int]]] = {
    # name: (builder, input shape without batch, classes, batch sizes)
    "small_cnn": (SmallCNN, (1, 8, 8), 10, [32, 128]),
    "mlp2048": (mlp2048, (1536,), 16, [256, 768]),
    "cnn128": (CNN128, (16, 16, 16), 10, [32, 64]),
}


def _qat(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    m = copy.deepcopy(model).train()
    m.qconfig = get_default_qat_qconfig("x86")  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat(m, inplace=False)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.Conv2d | Int8Linear | Int8Conv2d)


@contextlib.contextmanager
def _count_saved(model: nn.Module, layers_only: bool) -> Iterator[dict[str, int]]:
    """Bytes saved for backward during the block (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    out = {"bytes": 0}
    depth = [0]
    handles = []
    if layers_only:
        for m in model.modules():
            if _is_layer(m):
                handles.append(
                    m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1))
                )
                handles.append(
                    m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1))
                )

    def pack(t: torch.Tensor) -> torch.Tensor:
        if layers_only and depth[0] == 0:
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            out["bytes"] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        for h in handles:
            h.remove()


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    has_lac = any(isinstance(m, Int8Linear | Int8Conv2d) for m in model.modules())

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if has_lac:
            loss = loss + lac_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _run_case(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    build, shape, classes, _ = MODELS[name]
    torch.manual_seed(0)
    base = build().train()
    models = {"fp32": copy.deepcopy(base), "qat": _qat(base), "int8": prepare(base),
              "int8w": prepare(base, weights="int8")}
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    steps = {v: _step_fn(m, x, y) for v, m in models.items()}
    res: dict[str, Any] = {"model": name, "batch": batch}
    first: dict[str, float] = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        steps[v]()
        first[v] = time.perf_counter() - t0
        for _ in range(args.warmup):
            steps[v]()
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                steps[v]()
            cpu[v].append((time.process_time() - c0) / args.steps)
            wall[v].append((time.perf_counter() - w0) / args.steps)
    for v in VARIANTS:
        m = models[v]
        with _count_saved(m, layers_only=True) as layer_saved:
            out = m(x)
        del out
        with _count_saved(m, layers_only=False) as all_saved:
            out = m(x)
        del out
        step = training_step_cost(m, shape, batch, optimizer="sgd", momentum=0.9,
                                  dtype="fp32" if v in ("fp32", "qat") else "int8")
        res[v] = {
            "step_ms": 1e3 * statistics.median(cpu[v]),
            "step_ms_wall": 1e3 * statistics.median(wall[v]),
            "first_step_s": first[v],
            "saved_layer_bytes": layer_saved["bytes"],
            "saved_all_bytes": all_saved["bytes"],
            "step_peak_bytes": step.peak_bytes,
            "step_memory_bytes": {"weights": step.weight_bytes, "grads": step.grad_bytes,
                                  "optimizer": step.optimizer_bytes,
                                  "activations": step.activation_bytes,
                                  "transient": step.transient_bytes},
        }
    res["speedup_vs_fp32"] = statistics.median(
        f / i for f, i in zip(cpu["fp32"], cpu["int8"], strict=True)
    )
    res["speedup_vs_qat"] = statistics.median(
        q / i for q, i in zip(cpu["qat"], cpu["int8"], strict=True)
    )
    res["speedup_int8w_vs_fp32"] = statistics.median(
        f / i for f, i in zip(cpu["fp32"], cpu["int8w"], strict=True)
    )
    res["saved_ratio_vs_fp32"] = res["fp32"]["saved_layer_bytes"] / max(
        1, res["int8"]["saved_layer_bytes"]
    )
    return res


def _time_dw(n: int, c: int, hw: int, o: int) -> dict[str, Any]:
    """Median CPU ms of 5 interleaved calls of each conv weight-gradient kernel."""
    from clients.int8 import _kernels as K

    torch.manual_seed(0)
    x8 = torch.randint(-127, 128, (n, c, hw, hw), dtype=torch.int8)
    xu = K.to_u8(x8)
    g8 = torch.randint(-127, 128, (n, o, hw, hw), dtype=torch.int8)
    xf, gf, wf = x8.float(), g8.float(), torch.randn(o, c, 3, 3)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    mask = [False, True, False]
    fns: dict[str, Callable[[], object]] = {
        "fp32": lambda: torch.ops.aten.convolution_backward(
            gf, xf, wf, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        ),
        "shifted": lambda: K.qconv2d_weight_grad(xu, 1.0, g8, 1.0, (3, 3), *geo, "shifted"),
        "swapped": lambda: K.qconv2d_weight_grad(xu, 1.0, g8, 1.0, (3, 3), *geo, "swapped"),
        "im2col": lambda: K.im2col_conv2d_weight_grad(x8, 1.0, g8, 1.0, (3, 3), *geo),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(5):
        for k, f in fns.items():
            c0 = time.process_time()
            f()
            times[k].append(1e3 * (time.process_time() - c0))
    return {
        "shape": f"{n}x{c}x{hw}x{hw}->{o}",
        **{k: statistics.median(v) for k, v in times.items()},
    }


def _kernel_table() -> list[dict[str, Any]]:
    """Conv weight-gradient kernels side by side at the benchmark's conv shapes."""
    rows = []
    for shape in [(64, 128, 16, 128), (128, 16, 8, 32), (128, 1, 8, 16)]:
        row = _time_dw(*shape)
        rows.append(row)
        names = ["fp32", "shifted", "swapped", "im2col"]
        print(f"dW {row['shape']:>18s}: " + "  ".join(f"{k} {row[k]:.2f} ms" for k in names))
    return rows


GOALS = {"mlp2048": 2.0, "cnn128": 1.5}
HEADER = [
    "model", "batch", "fp32 ms", "qat ms", "int8 ms", "vs fp32", "vs qat",
    "saved fp32", "saved int8", "ratio", "peak fp32", "peak int8", "peak int8w",
    "int8w ms", "1st int8 s",
]  # fmt: skip


def _row(r: dict[str, Any]) -> list[str]:
    mib = 2.0**20
    return [
        f"{r['fp32']['step_ms']:.2f}",
        f"{r['qat']['step_ms']:.2f}",
        f"{r['int8']['step_ms']:.2f}",
        f"{r['speedup_vs_fp32']:.2f}x",
        f"{r['speedup_vs_qat']:.2f}x",
        f"{r['fp32']['saved_layer_bytes'] / mib:.2f}M",
        f"{r['int8']['saved_layer_bytes'] / mib:.2f}M",
        f"{r['saved_ratio_vs_fp32']:.2f}x",
        f"{r['fp32']['step_peak_bytes'] / mib:.2f}M",
        f"{r['int8']['step_peak_bytes'] / mib:.2f}M",
        f"{r['int8w']['step_peak_bytes'] / mib:.2f}M",
        f"{r['int8w']['step_ms']:.2f}",
        f"{r['int8']['first_step_s']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, all variants")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--kernels", action="store_true", help="also time the conv dW kernels")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 2, 2
    torch.set_num_threads(args.threads)
    kernels = _kernel_table() if args.kernels else []
    results = []
    for name in args.models:
        batches = MODELS[name][3][-1:] if args.quick else MODELS[name][3]
        for b in batches:
            results.append(_run_case(name, b, args))
            r = results[-1]
            print(f"{name} b={b}: " + " ".join(_row(r)), flush=True)
    goals = {}
    for r in results:
        key = f"{r['model']}@{r['batch']}"
        goals[key] = {
            "faster_than_qat": r["speedup_vs_qat"] > 1.0,
            "saved_3.5x_less": r["saved_ratio_vs_fp32"] >= 3.5,
        }
        if r["model"] in GOALS:
            goals[key][f"speedup_vs_fp32>={GOALS[r['model']]}"] = (
                r["speedup_vs_fp32"] >= GOALS[r["model"]]
            )
    report = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "args": vars(args),
        "compile_log_s": compile_log,
        "results": results,
        "goals": goals,
        "kernels_dw_ms": kernels,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1))
    print("\n" + " ".join(f"{h:>10s}" for h in HEADER))
    for r in results:
        print(" ".join(f"{c:>10s}" for c in [r["model"], str(r["batch"]), *_row(r)]))
    print("\ngoals:", json.dumps(goals))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
