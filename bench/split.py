"""Benchmark of split training with compressed features: SGQ side by side with baselines.

Runs ``configs/split.toml`` (``clients.split`` + ``sim.split_server``: 20 devices on
non-IID digits, SmallCNN cut after ``features``, 8 split steps of batch 8 per drawn device
and round) on tinyfleet's engine once per codec and seed. The same codec carries the
features up and the gradients down. Per codec: bytes up and down on the wire (the
engine's count of whole serialized messages, summed over the devices rows), ``feat.up``
(the uplink messages that carried features: every device's replies of a round but its
last, which returns its weights), the ratio of each against FP32 in the same run, final
test accuracy (mean and population std over the seeds) and the emulated time of the run.

Writes ``bench/out/split.json`` and prints a markdown table. Run:
``.venv/bin/python bench/split.py`` (3 seeds, about 3 minutes on 2 cores) or
``--quick`` (one seed, 8 rounds).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import clients.split
import sim.split_server
from sim.config import load_config
from sim.runner import run_experiment
from sim.split_server import feature_bytes_up

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "split.json"
CODECS = {
    "fp32": "fp32",
    "fp16": "fp16",
    "uniform8": "uniform:bits=8",
    "uniform4": "uniform:bits=4",
    "sgq (4-bit)": "sgq:layout=feature",
    "sgq bits=2": "sgq:layout=feature,bits=2",
}


def run_one(config: Path, codec: str, seed: int, rounds: int | None) -> dict[str, Any]:
    """One split run; its bytes, accuracy and emulated time."""
    over: dict[str, Any] = {"seed": seed, "split.codec": codec, "split.grad_codec": codec}
    if rounds:
        over["rounds"] = rounds
    cfg = load_config(config).with_overrides(**over)
    r = run_experiment(cfg, None, client_app=clients.split.app,
                       server_app=sim.split_server.app)
    s = r.summary
    return {"seed": seed, "accuracy": s["final_accuracy"], "bytes_up": s["bytes_up"],
            "bytes_down": s["bytes_down"], "feature_bytes_up": feature_bytes_up(r.devices),
            "emulated_s": s["emulated_time_s"], "failures": s["failures"],
            "wall_s": s["wall_time_s"]}


def summarize(runs: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per codec: means over seeds, ratios against FP32's means."""
    base = runs["fp32"]

    def mean(rs: list[dict[str, Any]], k: str) -> float:
        return float(np.mean([r[k] for r in rs]))

    rows = []
    for name, rs in runs.items():
        acc = [float(r["accuracy"]) for r in rs]
        rows.append({
            "codec": name, "spec": CODECS[name], "seeds": len(rs),
            "bytes_up": mean(rs, "bytes_up"), "bytes_down": mean(rs, "bytes_down"),
            "feature_bytes_up": mean(rs, "feature_bytes_up"),
            "ratio_up": mean(base, "bytes_up") / mean(rs, "bytes_up"),
            "ratio_down": mean(base, "bytes_down") / mean(rs, "bytes_down"),
            "ratio_features": mean(base, "feature_bytes_up") / mean(rs, "feature_bytes_up"),
            "acc_mean": float(np.mean(acc)), "acc_std": float(np.std(acc)),
            "emulated_s": mean(rs, "emulated_s"), "failures": mean(rs, "failures"),
        })
    return rows


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as the README shows it."""
    out = ["| codec | bytes up | bytes down | feat. up | up ratio | down ratio | feat. ratio "
           "| accuracy | emulated s |", "|" + "---|" * 9]
    for r in rows:
        out.append(
            f"| {r['codec']} | {r['bytes_up'] / 1e6:.2f} MB | {r['bytes_down'] / 1e6:.2f} MB "
            f"| {r['feature_bytes_up'] / 1e6:.2f} MB | {r['ratio_up']:.2f}x "
            f"| {r['ratio_down']:.2f}x | {r['ratio_features']:.2f}x "
            f"| {100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} | {r['emulated_s']:.1f} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every codec over the seeds and write ``bench/out/split.json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "split.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=0, help="override the config's rounds")
    ap.add_argument("--quick", action="store_true", help="one seed, 8 rounds")
    args = ap.parse_args(argv)
    seeds, rounds = (args.seeds[:1], 8) if args.quick else (args.seeds, args.rounds or None)
    t0 = time.perf_counter()
    runs = {name: [run_one(args.config, spec, seed, rounds) for seed in seeds]
            for name, spec in CODECS.items()}
    rows = summarize(runs)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "config": str(args.config), "seeds": seeds, "rounds": rounds, "rows": rows,
        "runs": runs, "wall_s": time.perf_counter() - t0, "python": platform.python_version(),
    }, indent=2))
    print(markdown(rows))
    print(f"\n{len(seeds)} seed(s), wall {time.perf_counter() - t0:.0f} s; wrote {OUT}")


if __name__ == "__main__":
    main()
