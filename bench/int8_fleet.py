"""INT8 training in the fleet: accuracy in FP32 and INT8, ablations, and MCU budgets.

Each variant runs a config end to end on tinyfleet's engine once per seed; only
``[train]`` fields change (``precision``, ``on_budget`` and the ``int8_*`` switches, each
set explicitly), so for a seed every variant sees the same fleet, shards and sampling.

``--suite ablations`` (``configs/default.toml``): FP32; Octo as ``clients.int8.prepare``
does by default (stochastic rounding, PRC, LAC); each aid switched off (no PRC, no LAC,
round to nearest); and int8 weights (no FP32 master copy) with and without QAS.

``--suite mcu`` (``configs/mcu-int8.toml``, STM32F746 and nRF52840 with a model whose
FP32 step does not fit either): FP32 full and sparse update, INT8 with FP32 master
weights, and INT8 with int8 weights + QAS, full and sparse where needed.

It reports the server's held-out accuracy after the last round (mean and standard
deviation over seeds), the difference to the FP32 variant's mean, and per device profile
the share of trainings that ran, their RAM (``peak_mem_bytes``) and emulated compute
time, from ``devices.csv``; the first budget refusal is kept in the JSON.

Writes ``bench/out/int8_<suite>.json`` and prints a markdown table. Run:
``.venv/bin/python bench/int8_fleet.py`` (7 variants x 3 seeds, about 8 minutes on 2
cores), ``--suite mcu`` (5 x 3, about 5 minutes) or ``--quick`` (two variants, one seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.config import load_config
from sim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]

_OCTO = {"train.precision": "int8", "train.int8_prc": True, "train.int8_lac": True,
         "train.int8_rounding": "stochastic", "train.int8_weights": False,
         "train.int8_qas": True}


def _v(**changes: Any) -> dict[str, Any]:
    """Octo's defaults with some ``[train]`` fields changed (every field set explicitly,
    so that a config's own ``int8_*`` choices do not leak into a variant)."""
    return {**_OCTO, **{f"train.{k}": v for k, v in changes.items()}}


#: suite -> (config, variant name -> ``[train]`` overrides)
SUITES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "ablations": ("configs/default.toml", {
        "fp32": {"train.precision": "fp32"},
        "int8": _v(),
        "int8 no PRC": _v(int8_prc=False),
        "int8 no LAC": _v(int8_lac=False),
        "int8 round to nearest": _v(int8_rounding="nearest"),
        "int8 weights + QAS": _v(int8_weights=True),
        "int8 weights, no QAS": _v(int8_weights=True, int8_qas=False),
    }),
    "mcu": ("configs/mcu-int8.toml", {
        "fp32, full update": {"train.precision": "fp32", "train.on_budget": "fail"},
        "fp32, sparse update": {"train.precision": "fp32", "train.on_budget": "sparse"},
        "int8 (FP32 master), sparse": _v(on_budget="sparse"),
        "int8 weights + QAS, full": _v(int8_weights=True, on_budget="fail"),
        "int8 weights + QAS, sparse": _v(int8_weights=True, on_budget="sparse"),
    }),
}


def _device_stats(out: Path) -> dict[str, dict[str, Any]]:
    """Per device profile: share of trainings that ran, their mean emulated compute
    seconds and RAM, and the first error (e.g. a budget refusal)."""
    per: dict[str, list[dict[str, str]]] = {}
    with (out / "devices.csv").open() as f:
        for row in csv.DictReader(f):
            if row.get("message_type") == "train":
                per.setdefault(row["profile"], []).append(row)
    stats = {}
    for prof, rows in sorted(per.items()):
        ran = [r for r in rows if r["status"] in ("ok", "straggler")]
        errors = [r["error"] for r in rows if r.get("error")]
        stats[prof] = {
            "trained_share": len(ran) / len(rows),
            "compute_s": float(np.mean([float(r["compute_s"]) for r in ran])) if ran else None,
            "peak_kb": (float(np.mean([float(r["peak_mem_bytes"]) for r in ran])) / 1024
                        if ran else None),
            "error": errors[0] if errors else "",
        }
    return stats


def run_variant(config: str, overrides: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """One end-to-end run; the last round's accuracy and what failed."""
    cfg = load_config(config).with_overrides(seed=seed, **overrides)
    t0 = time.perf_counter()
    res = run_experiment(cfg, out_dir=out)
    rows = res.rounds
    return {
        "seed": seed,
        "accuracy": float(rows[-1]["accuracy"]),
        "failures": int(sum(int(r["failures"]) for r in rows)),
        "stragglers": int(sum(int(r["stragglers"]) for r in rows)),
        "clock_s": float(rows[-1]["clock_s"]),
        "devices": _device_stats(out),
        "wall_s": time.perf_counter() - t0,
    }


def _table(rows: Sequence[dict[str, Any]]) -> str:
    profiles = sorted({p for r in rows for p in r["devices"]})
    head = " | ".join(f"{p}: trained, RAM, compute/training" for p in profiles)
    lines = [f"| variant | accuracy (mean ± std) | vs FP32 (points) | {head} |",
             "|---|---:|---:|" + "---|" * len(profiles)]
    for r in rows:
        cells = []
        for p in profiles:
            d = r["devices"].get(p)
            if d is None or d["peak_kb"] is None:
                cells.append("0%")
            else:
                cells.append(f"{100 * d['trained_share']:.0f}%, {d['peak_kb']:.0f} KB, "
                             f"{d['compute_s']:.3f} s")
        lines.append(f"| {r['variant']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['vs_fp32_points']:+.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _merge_devices(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted({p for r in runs for p in r["devices"]}):
        ds = [r["devices"][p] for r in runs if p in r["devices"]]
        ran = [d for d in ds if d["peak_kb"] is not None]
        out[p] = {
            "trained_share": float(np.mean([d["trained_share"] for d in ds])),
            "compute_s": float(np.mean([d["compute_s"] for d in ran])) if ran else None,
            "peak_kb": float(np.mean([d["peak_kb"] for d in ran])) if ran else None,
            "error": next((d["error"] for d in ds if d["error"]), ""),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="ablations", choices=list(SUITES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--variants", nargs="+", help="a subset of the suite's variants")
    ap.add_argument("--quick", action="store_true", help="the first two variants, one seed")
    args = ap.parse_args(argv)
    config, variants = SUITES[args.suite]
    names = args.variants or list(variants)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        ap.error(f"--variants: {unknown} not in suite {args.suite!r}: {list(variants)}")
    if args.quick:
        args.seeds, names = args.seeds[:1], names[:2]
    work = ROOT / "bench" / "out" / f"int8_{args.suite}_runs"
    rows: list[dict[str, Any]] = []
    for name in names:
        runs = []
        for seed in args.seeds:
            slug = "".join(c if c.isalnum() else "_" for c in name)
            run = run_variant(config, variants[name], seed, work / f"{slug}-{seed}")
            runs.append(run)
            print(f"{name:28s} seed {seed}: accuracy {run['accuracy']:.3f} failures "
                  f"{run['failures']} wall {run['wall_s']:.1f} s", flush=True)
        acc = np.array([r["accuracy"] for r in runs])
        rows.append({
            "variant": name,
            "overrides": variants[name],
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std()),
            "failures_mean": float(np.mean([r["failures"] for r in runs])),
            "devices": _merge_devices(runs),
            "runs": runs,
        })
    base = next((r["accuracy_mean"] for r in rows if r["variant"].startswith("fp32")), None)
    for r in rows:
        r["vs_fp32_points"] = 100 * (r["accuracy_mean"] - base) if base is not None else 0.0
    report: dict[str, Any] = {"suite": args.suite, "config": config, "seeds": args.seeds,
                              "results": rows}
    int8 = next((r for r in rows if r["variant"] == "int8"), None)
    if base is not None and int8 is not None:
        report["goal_int8_within_1_point"] = abs(int8["vs_fp32_points"]) <= 1.0
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"int8_{args.suite}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{config}, seeds {args.seeds}:\n" + _table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
