"""Benchmark of the engines side by side: Flower's, tinyfleet's, and the one-core floor.

For each workload, in one run, interleaved (each repetition rotates the order):

- ``floor``: the project's ClientApp function called directly (``app(msg, ctx)``) on the
  same devices' data, back to back in one plain process on one torch thread; no
  serialization, no aggregation, no evaluation. It is what one core can do.
- ``tinyfleet-local``: tinyfleet's engine, ClientApps in the driver process.
- ``tinyfleet-ray2``: tinyfleet's engine, ClientApps in 2 long-lived Ray actors.
- ``flower``: Flower's ``flwr.simulation.run_simulation`` (Ray backend, 1 CPU per client,
  so 2 actors here), through ``sim.flower_engine.run_with_flower``.

Every engine runs the project's ServerApp (FedAvg, central evaluation after each round,
no deadline) for ``R`` rounds. Reported apart:

- ``first_round_s``: from the call that starts the run (imports excluded) to the end of
  round 1's training: start-up (Ray, actors, data, the server's round-0 evaluation) plus
  one round. ``startup_s`` subtracts one steady-state round from it.
- ``steady_tps``: client trainings per second over rounds 2..R: the trainings of those
  rounds over the wall time from the end of round 1's training to the end of round R's
  (so it includes the server's aggregation and evaluation between rounds).
- ``x_floor``: ``steady_tps`` over the mean of the floor runs just before and just
  after it (every engine run is bracketed by floor runs: floor, engine, floor, ...).
- ``cpu_ms_per_training``: CPU time of the whole process tree (driver, Ray's actors,
  raylet, GCS) over rounds 2..R per training, and the driver's share: what a training
  costs in CPU, which other load on a shared machine moves far less than wall time.

Workloads: ``overhead`` (small CNN width 8 on digits, 1,000 devices, 10% per round),
``compute`` (small CNN width 32 on synthetic 3x32x32 images, 100 devices, 20%), and
``scale`` (the overhead workload on 10,000 devices at 10%, tinyfleet's Ray engine with 2
actors: wall time and peak RSS of the driver and of each actor).

Each measurement runs in a fresh subprocess (so peak memory and Ray's state are its own);
peak RSS is ``ru_maxrss`` for the driver and ``VmHWM`` of the Ray processes found among
the driver's descendants (the actors, and Ray's per-node dashboard and runtime-env agents).
Writes ``bench/out/engine.json`` and prints markdown
tables. Run: ``.venv/bin/python bench/engine.py`` (about 10 minutes on 2 shared cores);
``--quick`` for a short version (fewer rounds, one repetition, no 10,000-device run).
``--profile ENGINE:WORKLOAD`` runs one measurement under cProfile and prints the top of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out" / "engine.json"
ENGINES = ["floor", "tinyfleet-local", "tinyfleet-ray2", "flower"]

_BASE: dict[str, Any] = {
    "seed": 1,
    # 1,149 training digits over 1,000 devices: each draws 8 (data.min_samples), 2 steps.
    "data": {"source": "digits", "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "small_cnn", "args": {"width": 8}},
    "train": {"local_epochs": 1, "batch_size": 4, "lr": 0.05},
    "strategy": {"name": "fedavg", "fraction_train": 0.1, "deadline_s": 0.0},
}
_MCU_MIX = {"stm32f746": 0.6, "rpi4": 0.3, "jetson-nano": 0.1}


def workload_doc(name: str, rounds: int) -> dict[str, Any]:
    """The experiment document of a workload (see the module docstring)."""
    doc = json.loads(json.dumps(_BASE))
    doc["name"] = f"bench-{name}"
    doc["rounds"] = rounds
    if name == "overhead":
        doc["fleet"] = {"size": 1000, "mix": _MCU_MIX}
    elif name == "scale":
        doc["fleet"] = {"size": 10_000, "mix": _MCU_MIX}
    elif name == "compute":
        doc["fleet"] = {"size": 100, "mix": {"rpi4": 0.5, "jetson-nano": 0.5}}
        doc["data"] = {"source": "synthetic", "image_size": 32, "channels": 3,
                       "synthetic_size": 2000, "samples_per_device": 32}
        doc["model"] = {"name": "small_cnn", "args": {"width": 32}}
        doc["train"]["batch_size"] = 8
        doc["strategy"]["fraction_train"] = 0.2
    else:
        raise ValueError(f"workload: expected overhead, compute or scale, got {name!r}")
    return doc


# --------------------------------------------------------------------------- child side


def _descendants(root: int) -> list[int]:
    """Pids below ``root`` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _actor_peaks() -> dict[str, int]:
    """Peak RSS (bytes) of each Ray actor process under this one, by 'title:pid'."""
    peaks = {}
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
            with open(f"/proc/{pid}/status") as f:
                hwm = next((line for line in f if line.startswith("VmHWM:")), "")
        except OSError:
            continue
        if title.startswith("ray::") and "IDLE" not in title and hwm:
            peaks[f"{title.split()[0]}:{pid}"] = int(hwm.split()[1]) * 1024
    return peaks


def _tree_cpu_s() -> tuple[float, float]:
    """CPU seconds used so far by this process and by all its descendants (Ray's actors,
    raylet and GCS among them): a cost that, unlike wall time, other load hardly moves."""
    t = os.times()
    tick = os.sysconf("SC_CLK_TCK")
    others = 0.0
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        others += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return t.user + t.system, others


class _Marks:
    """Wall instants (and CPU used) at the end of each round's training; actor peaks."""

    def __init__(self, t0: float, watch_actors: bool) -> None:
        self.t0 = t0
        self.ends: dict[int, float] = {}
        self.cpu: dict[int, tuple[float, float]] = {}
        self.watch_actors = watch_actors
        self.actors: dict[str, int] = {}

    def __call__(self, spans: list[Any]) -> None:
        span = spans[-1]
        if span.message_type.split(".")[0] != "train":
            return
        try:
            rnd = int(span.group_id)
        except ValueError:
            return
        self.ends[rnd] = time.perf_counter() - self.t0
        self.cpu[rnd] = _tree_cpu_s()
        if self.watch_actors:
            for k, v in _actor_peaks().items():
                self.actors[k] = max(v, self.actors.get(k, 0))


def _trainings_by_round(devices: list[dict[str, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for d in devices:
        if d["message_type"] == "train" and d["status"] != "error":
            out[int(d["round"])] = out.get(int(d["round"]), 0) + 1
    return out


def _run_tinyfleet(cfg: Any, backend: str, actors: int, marks: _Marks) -> dict[int, int]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from sim.runner import run_experiment
    from sim.server_app import app as project_server_app

    timed = ServerApp()

    @timed.main()
    def _main(grid: Grid, context: Context) -> None:
        # The engine's own progress hook gives the instant each round's training ends.
        prev = grid.on_progress  # type: ignore[attr-defined]

        def hook(g: Any) -> None:
            marks(g.state.spans)
            if prev is not None:
                prev(g)

        grid.on_progress = hook  # type: ignore[attr-defined]
        project_server_app(grid=grid, context=context)

    res = run_experiment(cfg, None, backend=backend, actors=actors, server_app=timed)
    if res.summary["failures"]:
        raise RuntimeError(f"{res.summary.get('errors')}")
    return _trainings_by_round(res.devices)


def _run_flower(cfg: Any, marks: _Marks) -> dict[int, int]:
    from sim.flower_engine import run_with_flower

    res = run_with_flower(cfg, None, on_progress=lambda g: marks(g.spans))
    if res.summary["failures"]:
        raise RuntimeError(f"{res.summary.get('errors')}")
    return _trainings_by_round(res.devices)


def _run_floor(cfg: Any, marks: _Marks) -> dict[int, int]:
    """The same trainings back to back: ``app(msg, ctx)`` on one thread, nothing else."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import app, build_training_model

    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, 1  # what a Message needs to be built
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    spec = cfg.client
    run_config = cfg.to_run_config()
    torch.manual_seed(cfg.seed)
    arrays = ArrayRecord(build_training_model(spec).state_dict())
    rng = random.Random(cfg.seed)
    n = spec.fleet.size
    k = max(int(n * cfg.strategy.fraction_train), cfg.strategy.min_train)
    counts: dict[int, int] = {}
    for rnd in range(1, cfg.rounds + 1):
        for pid in rng.sample(range(n), k):
            content = RecordDict({"arrays": arrays,
                                  "config": ConfigRecord({"server-round": rnd})})
            msg = Message(content, dst_node_id=pid + 1, message_type="train")
            ctx = Context(run_id=1, node_id=pid + 1,
                          node_config={"partition-id": pid, "num-partitions": n},
                          state=RecordDict(), run_config=dict(run_config))
            reply = app(msg, ctx)
            if reply.has_error():
                raise RuntimeError(reply.error.reason)
        counts[rnd] = k
        marks.ends[rnd] = time.perf_counter() - marks.t0
        marks.cpu[rnd] = _tree_cpu_s()
    return counts


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    from sim.config import from_doc

    cfg = from_doc(workload_doc(spec["workload"], spec["rounds"]))
    engine = spec["engine"]
    t0 = time.perf_counter()
    marks = _Marks(t0, watch_actors=engine in ("tinyfleet-ray2", "flower"))
    if engine == "floor":
        counts = _run_floor(cfg, marks)
    elif engine == "tinyfleet-local":
        counts = _run_tinyfleet(cfg, "local", 0, marks)
    elif engine == "tinyfleet-ray2":
        counts = _run_tinyfleet(cfg, "ray", 2, marks)
    elif engine == "flower":
        counts = _run_flower(cfg, marks)
    else:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    wall = time.perf_counter() - t0
    ends = marks.ends
    r = cfg.rounds
    steady_n = sum(counts.get(i, 0) for i in range(2, r + 1))
    steady_s = ends[r] - ends[1] if r >= 2 else float("nan")
    tps = steady_n / steady_s if steady_s > 0 else float("nan")
    round_s = steady_s / (r - 1) if r >= 2 else float("nan")
    (d1, o1), (dr, o_r) = marks.cpu[1], marks.cpu[r]
    n = max(steady_n, 1)
    return {
        "engine": engine,
        "workload": spec["workload"],
        "rounds": r,
        "trainings": sum(counts.values()),
        "first_round_s": ends[1],
        "steady_round_s": round_s,
        "startup_s": ends[1] - round_s,
        "steady_trainings": steady_n,
        "steady_tps": tps,
        # CPU per steady training, driver and all its descendants (ms).
        "cpu_ms_per_training": 1e3 * ((dr - d1) + (o_r - o1)) / n,
        "driver_cpu_ms_per_training": 1e3 * (dr - d1) / n,
        "wall_s": wall,
        "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "actor_peak_rss": marks.actors,
    }


# -------------------------------------------------------------------------- parent side


def _measure(spec: dict[str, Any], profile: bool = False,
             timeout_s: float = 900.0) -> dict[str, Any]:
    """One measurement in a fresh process; a failed one is a row with an ``error``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", str(Path(tmp) / "prof")]
        cmd += [__file__, "--child", json.dumps(spec), "--result", str(out)]
        # RAY_ADDRESS=local: start a Ray of our own. Without it ray.init() joins the
        # latest cluster anyone on this machine started with `ray start`.
        env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
               "PYTHONWARNINGS": "ignore", "RAY_ADDRESS": "local"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**spec, "error": f"timed out after {timeout_s} s"}
        if proc.returncode != 0 or not out.exists():
            return {**spec, "error": proc.stderr[-3000:]}
        if profile:
            import pstats

            st = pstats.Stats(str(Path(tmp) / "prof"))
            st.sort_stats("cumulative").print_stats(35)
            st.sort_stats("tottime").print_stats(25)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _table(rows: list[dict[str, Any]], workload: str) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["workload"] == workload and "error" not in r:
            by.setdefault(r["engine"], []).append(r)
    lines = [
        "| engine | first round (s) | start-up (s) | steady round (s) | steady trainings/s "
        "| x floor | x flower | CPU ms / training (driver) | driver peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for eng in ENGINES:
        rs = by.get(eng)
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("first_round_s", "startup_s", "steady_round_s", "steady_tps",
                         "x_floor", "x_flower", "driver_peak_rss", "cpu_ms_per_training",
                         "driver_cpu_ms_per_training")}
        lines.append(
            f"| {eng} | {med['first_round_s']:.2f} | {med['startup_s']:.2f} "
            f"| {med['steady_round_s']:.3f} | {med['steady_tps']:.0f} "
            f"| {med['x_floor']:.2f} | {med['x_flower']:.2f} "
            f"| {med['cpu_ms_per_training']:.1f} ({med['driver_cpu_ms_per_training']:.1f}) "
            f"| {_mb(med['driver_peak_rss'])} |"
        )
    return "\n".join(lines)


def _scale_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | devices | rounds | trainings | wall (s) | first round (s) "
        "| steady trainings/s | driver peak RSS (MB) | actor peak RSS (MB, each) "
        "| Ray agents (MB, each) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["workload"] != "scale" or "error" in r:
            continue
        peaks = r["actor_peak_rss"]
        actors = ", ".join(_mb(v) for k, v in sorted(peaks.items()) if "Agent" not in k)
        agents = ", ".join(_mb(v) for k, v in sorted(peaks.items()) if "Agent" in k)
        lines.append(
            f"| {r['engine']} | 10,000 | {r['rounds']} | {r['trainings']} | {r['wall_s']:.1f} "
            f"| {r['first_round_s']:.2f} | {r['steady_tps']:.0f} "
            f"| {_mb(r['driver_peak_rss'])} | {actors or '-'} | {agents or '-'} |"
        )
    return "\n".join(lines)


def _bracketed(rows: list[dict[str, Any]]) -> None:
    """``x_floor``: each engine's throughput over the mean of the floor runs just before
    and just after it (load on a shared machine drifts over minutes, not seconds);
    ``x_flower``: that ratio over Flower's in the same repetition."""
    for i, r in enumerate(rows):
        if r["engine"] == "floor":
            r["x_floor"] = 1.0
            continue
        near = [rows[j]["steady_tps"] for j in (i - 1, i + 1)
                if 0 <= j < len(rows) and rows[j]["engine"] == "floor"]
        r["x_floor"] = r["steady_tps"] / statistics.mean(near) if near else float("nan")
    flw = [r["x_floor"] for r in rows if r["engine"] == "flower"]
    for r in rows:
        r["x_flower"] = r["x_floor"] / flw[0] if flw else float("nan")


def _print_tables(rows: list[dict[str, Any]], workloads: list[str], rounds: int,
                  reps: int) -> None:
    for w in workloads:
        print(f"\n### {w} (R = {rounds}, median of {reps} repetition(s); each engine "
              f"between two floor runs)\n")
        print(_table(rows, w))
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"\n{len(failed)} measurement(s) failed: "
              + ", ".join(f"{r['engine']}/{r['workload']}" for r in failed))
    if any(r["workload"] == "scale" and "error" not in r for r in rows):
        print("\n### scale: 10,000 devices at 10%\n")
        print(_scale_table(rows))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run one child measurement or the whole benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short version (fewer rounds)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 2; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds R (default 10; quick 4)")
    p.add_argument("--workloads", default="overhead,compute",
                   help="comma-separated: overhead, compute")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--no-scale", action="store_true", help="skip the 10,000-device run")
    p.add_argument("--profile", default=None, metavar="ENGINE:WORKLOAD")
    p.add_argument("--tables", action="store_true",
                   help="only print the tables of the last run (bench/out/engine.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        Path(a.result).write_text(json.dumps(child(json.loads(a.child))))
        return 0
    if a.tables:
        saved = json.loads(OUT.read_text())
        _print_tables(saved["rows"], list(saved["meta"]["workloads"]), saved["meta"]["rounds"],
                      saved["meta"]["reps"])
        return 0
    rounds = a.rounds or (4 if a.quick else 10)
    if a.profile:
        eng, wl = a.profile.split(":")
        r = _measure({"engine": eng, "workload": wl, "rounds": rounds}, profile=True)
        print(json.dumps(r, indent=1))
        return 0
    reps = a.reps or (1 if a.quick else 2)
    engines = [e for e in a.engines.split(",") if e]
    workloads = [w for w in a.workloads.split(",") if w]
    rows: list[dict[str, Any]] = []
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    others = [e for e in engines if e != "floor"]
    for rep in range(reps):
        for w in workloads:
            # floor, engine, floor, engine, ..., floor; each repetition rotates the order.
            k = rep % max(len(others), 1)
            order = others[k:] + others[:k]
            seq = ["floor"]
            for eng in order:
                seq += [eng, "floor"]
            rep_rows = []
            for eng in seq:
                r = _measure({"engine": eng, "workload": w, "rounds": rounds})
                r["rep"] = rep
                rep_rows.append(r)
                if "error" in r:
                    log(f"rep {rep} {w:8s} {eng:16s} FAILED: {r['error'][-500:]}")
                    continue
                log(f"rep {rep} {w:8s} {eng:16s} first {r['first_round_s']:6.2f}s "
                    f"steady {r['steady_tps']:7.1f}/s cpu {r['cpu_ms_per_training']:6.1f} ms/tr "
                    f"wall {r['wall_s']:6.1f}s load {os.getloadavg()[0]:.1f}")
            _bracketed([r for r in rep_rows if "error" not in r])
            rows += rep_rows
    if not (a.quick or a.no_scale):
        r = _measure({"engine": "tinyfleet-ray2", "workload": "scale", "rounds": 3})
        r["rep"] = 0
        log(f"scale tinyfleet-ray2: {r['error'] if 'error' in r else r['wall_s']} ")
        rows.append(r)
    meta = {
        "command": "bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": rounds,
        "reps": reps,
        "host": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workloads": {w: workload_doc(w, rounds) for w in workloads},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    _print_tables(rows, workloads, rounds, reps)
    print(f"\n-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
