"""Continual learning in the fleet: plain fine-tuning vs replay vs EWC vs LwF, same fleet.

Each config (``configs/continual-*.toml``) runs end to end on tinyfleet's engine once per
method and seed; only ``[continual].method`` and the top-level ``seed`` change, so for a
seed every method sees the same fleet (profiles, shards, schedules, sampling). From the
last round's ``rounds.csv`` row it reports the fleet's final average accuracy over all
tasks, forgetting and backward transfer (``sim.continual_server``), mean and standard
deviation over seeds, plus the emulated compute the method cost (``compute-s`` summed
over trainings, replayed examples, Fisher backwards and teacher forwards included).

Writes ``bench/out/continual.json`` and prints a markdown table. Run:
``.venv/bin/python bench/continual.py`` (all three configs, 3 seeds, about 6 minutes on
2 cores) or ``--quick`` (class-incremental only, one seed, about 30 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.config import from_doc
from sim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"class-incremental": "configs/continual-class.toml",
           "domain-shift": "configs/continual-domain.toml",
           "mix": "configs/continual-mix.toml"}
METHODS = ("finetune", "replay", "ewc", "lwf")


def run_one(doc: dict[str, Any], method: str, seed: int) -> dict[str, float]:
    """One fleet run of ``doc`` with ``method`` and fleet ``seed``: its final figures."""
    d = copy.deepcopy(doc)
    d["seed"] = seed
    d["continual"]["method"] = method
    t0 = time.perf_counter()
    res = run_experiment(from_doc(d))
    last = res.rounds[-1]
    train = [r for r in res.devices if r["message_type"] == "train" and r["status"] == "ok"]
    return {
        "avg_acc": float(last["avg_acc"]),
        "forgetting": float(last["forgetting"]),
        "bwt": float(last["bwt"]),
        "compute_s": float(sum(float(r["compute_s"]) for r in train)),
        "failures": float(res.summary["failures"]),
        "wall_s": time.perf_counter() - t0,
    }


def _stat(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max())}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the comparison and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="class-incremental only, one seed")
    ap.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    args = ap.parse_args(argv)
    kinds = args.configs or (["class-incremental"] if args.quick else list(CONFIGS))
    seeds = list(range(1, 2 if args.quick else args.seeds + 1))
    out: dict[str, Any] = {"seeds": seeds, "quick": args.quick, "results": {}}
    lines = ["| stream | method | final avg acc | forgetting | BWT | emulated compute (s) |",
             "|---|---|---|---|---|---|"]
    for kind in kinds:
        path = ROOT / CONFIGS[kind]
        doc = tomllib.loads(path.read_text())
        out["results"][kind] = {"config": CONFIGS[kind]}
        for method in args.methods:
            runs = [run_one(doc, method, s) for s in seeds]
            stats = {k: _stat([r[k] for r in runs]) for k in runs[0]}
            out["results"][kind][method] = {"runs": runs, **stats}
            cells = [f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}"
                     for k in ("avg_acc", "forgetting", "bwt")]
            lines.append(f"| {kind} | {method} | " + " | ".join(cells)
                         + f" | {stats['compute_s']['mean']:.1f} |")
            print(f"{kind:>18} {method:<9} " + "  ".join(cells)
                  + f"  ({sum(r['wall_s'] for r in runs):.0f} s)", file=sys.stderr)
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "continual.json").write_text(json.dumps(out, indent=2))
    print(f"{len(seeds)} seed(s) {seeds}; mean ± std over seeds; final round of each run")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
