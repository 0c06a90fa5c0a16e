"""The ``tinyfleet`` command line: run experiments, repeat them over seeds, list devices."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from devices.errors import TinyFleetError

__all__ = ["main"]


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected e.g. 1,2,3, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds: expected at least one seed")
    return seeds


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyfleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment config")
    r.add_argument("config", nargs="?", default="configs/default.toml")
    r.add_argument("--out", default=None, help="results folder (default results/<name>)")
    r.add_argument("--seeds", type=_parse_seeds, default=None,
                   help="repeat with these seeds (e.g. 1,2,3) and report mean and spread")
    r.add_argument("--engine", choices=["tinyfleet", "flower"], default=None)
    r.add_argument("--backend", choices=["local", "ray"], default=None)
    r.add_argument("--actors", type=int, default=None)
    r.add_argument("--ray-address", default=None, help="join this Ray cluster")
    r.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.precision=\"int8\" (TOML value)")
    r.add_argument("--no-progress", action="store_true")
    rs = sub.add_parser("resume", help="continue an interrupted run from its folder")
    rs.add_argument("dir")
    rs.add_argument("--backend", choices=["local", "ray"], default=None)
    rs.add_argument("--actors", type=int, default=None)
    rs.add_argument("--no-progress", action="store_true")
    sub.add_parser("profiles", help="list the device profiles")
    # Real clusters (Flower deployment): certs, superlink, register, supernode, deploy,
    # compare -- see sim/cluster_cli.py and docs/cluster.md.
    from sim.cluster_cli import add_commands

    add_commands(sub)
    return p


def _overrides(items: list[str]) -> dict[str, Any]:
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TinyFleetError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _run(args: argparse.Namespace) -> int:
    from sim.config import load_config
    from sim.runner import run_experiment

    cfg = load_config(args.config)
    over = _overrides(args.set)
    if args.rounds is not None:
        over["rounds"] = args.rounds
    if args.engine:
        over["engine.name"] = args.engine
    if over:
        cfg = cfg.with_overrides(**over)
    out = Path(args.out or Path("results") / Path(args.config).stem)
    seeds = args.seeds or [cfg.seed]
    summaries = []
    for seed in seeds:
        c = cfg.with_overrides(seed=seed) if args.seeds else cfg
        dest = out / f"seed-{seed}" if args.seeds else out
        if c.engine.name == "flower":
            from sim.flower_engine import run_with_flower

            res = run_with_flower(c, dest, progress=not args.no_progress)
        else:
            res = run_experiment(c, dest, progress=not args.no_progress,
                                 backend=args.backend, actors=args.actors,
                                 ray_address=args.ray_address)
        s = res.summary
        summaries.append(s)
        print(f"seed {seed}: accuracy {s['final_accuracy']:.4f}  emulated "
              f"{s['emulated_time_s']:,.1f} s  energy {s['energy_j']:,.1f} J  "
              f"stragglers {s['stragglers']}  failures {s['failures']}  "
              f"wall {s['wall_time_s']:.1f} s  -> {dest}")
    if len(summaries) > 1:
        _report_seeds(seeds, summaries, out)
    return 0


def _report_seeds(seeds: list[int], summaries: list[dict[str, Any]], out: Path) -> None:
    def ms(key: str) -> tuple[float, float]:
        vals = [float(s[key]) for s in summaries]
        return statistics.mean(vals), statistics.stdev(vals)

    agg = {k: dict(zip(("mean", "std"), ms(k), strict=True))
           for k in ("final_accuracy", "emulated_time_s", "energy_j", "bytes_up")}
    agg["seeds"] = seeds  # type: ignore[assignment]
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(agg, indent=2))
    a = agg["final_accuracy"]
    print(f"over seeds {seeds}: accuracy {a['mean']:.4f} ± {a['std']:.4f} (std); "
          f"emulated time {agg['emulated_time_s']['mean']:,.1f} s; -> {out / 'seeds.json'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tinyfleet`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "resume":
            from sim.runner import resume_experiment

            res = resume_experiment(args.dir, progress=not args.no_progress,
                                    backend=args.backend, actors=args.actors)
            s = res.summary
            print(f"resumed {args.dir}: {s['engine']['replayed_calls']} calls replayed; "
                  f"accuracy {s['final_accuracy']:.4f}  emulated {s['emulated_time_s']:,.1f} s")
            return 0
        from sim.cluster_cli import COMMANDS, run_command

        if args.command in COMMANDS:
            return run_command(args)
        if args.command == "profiles":
            from devices.profiles import list_profiles, load_profile

            for name in list_profiles():
                p = load_profile(name)
                print(f"{name:18s} {p.device_class:4s} RAM {p.ram_bytes:>12,d} B  "
                      f"fp32 {p.macs_per_s['fp32']:.3g} MAC/s  int8 {p.macs_per_s['int8']:.3g}")
            return 0
    except TinyFleetError as exc:
        print(f"tinyfleet: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
