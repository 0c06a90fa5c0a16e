"""Benchmark and cross-check of the cost model (devices.cost).

1. MACs of MobileNetV2-1.0 and ResNet-18 at 224x224: ours vs torch's FlopCounterMode.
2. Memory: predicted step memory (saved activations + gradients + live working set)
   vs the peak resident-set growth of a real CPU training step, each in a fresh process.
3. Overhead: one plain CPU training step vs one uncached measurement vs a cache hit,
   timed side by side in the same run.
4. MobileNetV2-w0.35 (10 classes), 128x128, batch 1 on stm32f746: full FP32 update vs the
   cheapest sparse plan, and a sparse plan on a 4 MB variant of the board.
5. Roofline vs reality on this host: a "host" profile calibrated here (one thread: FP32
   matmul MAC/s, tensor copy bandwidth), then predicted vs measured step time.

Writes bench/out/cost_model.json and prints tables. Run:
``.venv/bin/python bench/cost_model.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clients.models import MobileNetV2, ResNet18, SmallCNN
from devices import (
    BudgetError,
    clear_cost_cache,
    format_bytes,
    load_profile,
    plan_sparse_update,
    ram_needed_bytes,
    step_time_s,
    training_step_cost,
)

OUT = Path(__file__).resolve().parent / "out" / "cost_model.json"

_MEM_CHILD = r"""
import sys, torch
from torch import nn
from clients.models import MobileNetV2, ResNet18, SmallCNN
torch.set_num_threads(1)
name, batch, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = {"mobilenet_v2_035": lambda: MobileNetV2(0.35, num_classes=10),
         "resnet18": lambda: ResNet18(num_classes=10),
         "small_cnn": lambda: SmallCNN(3, 10, 64)}[name]()
x = torch.randn(batch, 3, side, side)
y = torch.randint(0, 10, (batch,))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
model(x[:1]).sum()  # first-call allocations (thread pools, oneDNN) before the baseline
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
    f.write("5")
before = status("VmRSS")
loss = nn.functional.cross_entropy(model(x), y)
loss.backward()
print(status("VmHWM") - before)
"""


def _macs_table() -> list[dict[str, Any]]:
    rows = []
    for name, model in [("mobilenet_v2_1.0", MobileNetV2(1.0)), ("resnet18", ResNet18())]:
        cost = training_step_cost(model, (3, 224, 224), 1)
        m = copy.deepcopy(model).to("meta")
        with FlopCounterMode(display=False) as counter:
            out = m(torch.randn(1, 3, 224, 224, device="meta"))
            fwd = counter.get_total_flops()
            nn.functional.cross_entropy(out, torch.zeros(1, dtype=torch.long,
                                                         device="meta")).backward()
        rows.append({
            "model": name,
            "fwd_macs": cost.fwd_macs,
            "bwd_macs": cost.bwd_macs,
            "bwd_over_fwd": cost.bwd_macs / cost.fwd_macs,
            "torch_fwd_macs": fwd // 2,
            "torch_bwd_macs": (counter.get_total_flops() - fwd) // 2,
        })
    return rows


def _memory_table() -> list[dict[str, Any]]:
    rows = []
    cases = [("small_cnn", 64, 32), ("mobilenet_v2_035", 16, 128), ("resnet18", 16, 112)]
    builders = {"mobilenet_v2_035": lambda: MobileNetV2(0.35, num_classes=10),
                "resnet18": lambda: ResNet18(num_classes=10),
                "small_cnn": lambda: SmallCNN(3, 10, 64)}
    for name, batch, side in cases:
        cost = training_step_cost(builders[name](), (3, side, side), batch)
        predicted = cost.activation_bytes + cost.grad_bytes + cost.transient_bytes
        # large blocks via mmap, so that RSS follows live tensors and frees return memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _MEM_CHILD, name, str(batch), str(side)],
                             capture_output=True, text=True, check=True, env=env)
        measured = int(out.stdout.strip().splitlines()[-1])
        rows.append({"model": name, "batch": batch, "side": side,
                     "predicted_step_bytes": predicted, "measured_rss_growth_bytes": measured,
                     "measured_over_predicted": measured / predicted,
                     "activation_bytes": cost.activation_bytes,
                     "grad_bytes": cost.grad_bytes, "transient_bytes": cost.transient_bytes})
    return rows


def _overhead() -> dict[str, float]:
    torch.set_num_threads(1)
    model = MobileNetV2(0.35, num_classes=10)
    x, y = torch.randn(8, 3, 96, 96), torch.randint(0, 10, (8,))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    step()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    plain = (time.perf_counter() - t0) / 3
    clear_cost_cache()
    training_step_cost(SmallCNN(), (1, 8, 8), 2)  # warm the tracer's imports
    t0 = time.perf_counter()
    training_step_cost(model, (3, 96, 96), 8)
    measure = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        training_step_cost(model, (3, 96, 96), 8)
    hit = (time.perf_counter() - t0) / 10
    return {"plain_step_s": plain, "measure_s": measure, "cache_hit_s": hit,
            "measure_over_step": measure / plain, "hit_over_step": hit / plain}


def _mcu_case() -> dict[str, Any]:
    model = MobileNetV2(0.35, num_classes=10)
    stm = load_profile("stm32f746")
    full = training_step_cost(model, (3, 128, 128), 1)
    bias_only = training_step_cost(model, (3, 128, 128), 1,
                                   trainable=["classifier.1.bias"])
    n_params = sum(p.numel() for p in model.parameters())
    try:
        plan_sparse_update(model, (3, 128, 128), 1, stm, weight_storage_bytes=n_params)
        stm_message = "fits"
    except BudgetError as exc:
        stm_message = str(exc)
    big = dataclasses.replace(stm, name="stm32f746-4mb", ram_bytes=4 * 1024**2)
    plan = plan_sparse_update(model, (3, 128, 128), 1, big, weight_storage_bytes=n_params)
    return {
        "full_fp32_peak_bytes": full.peak_bytes,
        "full_fp32_ram_needed_stm32_bytes": ram_needed_bytes(full, stm),
        "full_fp32_step_s_stm32": step_time_s(full, stm),
        "bias_only_ram_needed_stm32_bytes": ram_needed_bytes(bias_only, stm),
        "bias_only_transient_bytes": bias_only.transient_bytes,
        "bias_only_transient_layer": bias_only.transient_layer,
        "stm32_plan": stm_message,
        "plan_4mb_summary": plan.summary,
        "plan_4mb_ram_needed_bytes": plan.ram_needed_bytes,
        "plan_4mb_step_s": step_time_s(plan.cost, big),
    }


def _best_of(fn: Any, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _roofline_check() -> dict[str, Any]:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    macs_per_s = 1024**3 / _best_of(lambda: a @ b)
    src = torch.randn(32 * 1024**2)  # 128 MB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best_of(lambda: dst.copy_(src))
    host = dataclasses.replace(load_profile("rpi4"), name="host-1-thread",
                               macs_per_s={"fp32": macs_per_s, "int8": macs_per_s},
                               mem_bandwidth_bytes_per_s=bandwidth)
    rows = []
    for name, model, shape, batch in [
        ("small_cnn", SmallCNN(3, 10, 64), (3, 32, 32), 32),
        ("mobilenet_v2_035", MobileNetV2(0.35, num_classes=10), (3, 128, 128), 8),
        ("resnet18", ResNet18(num_classes=10), (3, 112, 112), 8),
    ]:
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

        def step(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        measured = _best_of(step)
        predicted = step_time_s(training_step_cost(model, shape, batch), host)
        rows.append({"model": name, "batch": batch, "measured_s": measured,
                     "predicted_s": predicted, "predicted_over_measured": predicted / measured})
    return {"host_fp32_macs_per_s": macs_per_s, "host_bandwidth_bytes_per_s": bandwidth,
            "rows": rows}


def main() -> None:
    results: dict[str, Any] = {"macs": _macs_table(), "memory": _memory_table(),
                               "overhead": _overhead(), "mcu": _mcu_case(),
                               "roofline": _roofline_check()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"{'model':<18}{'fwd M':>10}{'bwd M':>10}{'bwd/fwd':>9}{'torch fwd M':>13}"
          f"{'torch bwd M':>13}")
    for r in results["macs"]:
        print(f"{r['model']:<18}{r['fwd_macs'] / 1e6:>10.2f}{r['bwd_macs'] / 1e6:>10.2f}"
              f"{r['bwd_over_fwd']:>9.3f}{r['torch_fwd_macs'] / 1e6:>13.2f}"
              f"{r['torch_bwd_macs'] / 1e6:>13.2f}")
    print(f"\n{'model':<18}{'batch':>6}{'side':>6}{'predicted':>12}{'RSS growth':>12}"
          f"{'ratio':>7}")
    for r in results["memory"]:
        print(f"{r['model']:<18}{r['batch']:>6}{r['side']:>6}"
              f"{format_bytes(r['predicted_step_bytes']):>12}"
              f"{format_bytes(r['measured_rss_growth_bytes']):>12}"
              f"{r['measured_over_predicted']:>7.2f}")
    o = results["overhead"]
    print(f"\nplain step {o['plain_step_s'] * 1e3:.1f} ms; uncached measurement "
          f"{o['measure_s'] * 1e3:.1f} ms ({o['measure_over_step']:.2f}x a step); cache hit "
          f"{o['cache_hit_s'] * 1e3:.2f} ms ({o['hit_over_step']:.3f}x)")
    mcu = results["mcu"]
    print(f"\nMobileNetV2-w0.35 128x128 batch 1 on stm32f746: full FP32 update needs "
          f"{format_bytes(mcu['full_fp32_ram_needed_stm32_bytes'])} of RAM; training only "
          f"the classifier bias needs {format_bytes(mcu['bias_only_ram_needed_stm32_bytes'])}"
          f" (largest live working set {format_bytes(mcu['bias_only_transient_bytes'])} in "
          f"{mcu['bias_only_transient_layer']})")
    print(f"plan on stm32f746: {mcu['stm32_plan']}")
    print(f"plan on a 4 MB variant: {mcu['plan_4mb_summary']}")
    roof = results["roofline"]
    print(f"\nhost (1 thread): {roof['host_fp32_macs_per_s'] / 1e9:.1f} G FP32 MAC/s, "
          f"{roof['host_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"{'model':<18}{'batch':>6}{'measured ms':>13}{'roofline ms':>13}{'ratio':>7}")
    for r in roof["rows"]:
        print(f"{r['model']:<18}{r['batch']:>6}{r['measured_s'] * 1e3:>13.1f}"
              f"{r['predicted_s'] * 1e3:>13.1f}{r['predicted_over_measured']:>7.2f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
