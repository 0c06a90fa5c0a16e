"""Run an experiment end to end, or any Flower app, on tinyfleet's engine.

``run_experiment`` takes a validated config, builds the fleet (profiles by the mix and the
seed), runs the project's ServerApp and ClientApp on the engine, and writes the results
(``sim.results``). ``run_simulation`` is a drop-in for ``flwr.simulation.run_simulation``:
the same arguments, plus the fleet, so that a Flower user changes one import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from devices.errors import ConfigError
from devices.fleet import assign_profiles
from sim import results
from sim.availability import AlwaysOnline, Availability, diurnal_trace, load_trace
from sim.config import ExperimentConfig, from_doc
from sim.engine import FleetGrid, ReplyRecord, make_slots, run_server_app
from sim.executor import LocalExecutor, RayExecutor
from sim.guard import check_resources
from sim.journal import Journal, JournaledExecutor, atomic_write

__all__ = ["RunResult", "resume_experiment", "run_experiment", "run_simulation"]

log = logging.getLogger("tinyfleet")


@dataclass
class RunResult:
    """What a run produced: per-round and per-device rows, summary, final model arrays."""

    rounds: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    summary: dict[str, Any]
    final_arrays: Any
    out_dir: Path | None
    grid: FleetGrid | None = None


def _quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)


def _availability(cfg: ExperimentConfig) -> Availability:
    a = cfg.availability
    if a.kind == "trace":
        return load_trace(a.path, a.period_s if a.period_s else 0.0)
    if a.kind == "diurnal":
        return diurnal_trace(cfg.client.fleet.size, cfg.seed, period_s=a.period_s,
                             always_on_share=a.always_on_share)
    return AlwaysOnline()


def _executor(
    client_app: ClientApp,
    backend: str,
    actors: int,
    address: str,
    count_macs: bool = False,
    faults: Any = None,
) -> Any:
    if backend == "ray":
        runtime_env = None
        if address:
            # Ship the project's code to other machines; no shared file system needed.
            root = Path(__file__).resolve().parents[1]
            runtime_env = {"working_dir": str(root),
                           "excludes": [".venv", ".git", "results", "bench/out"]}
        return RayExecutor(client_app, actors or None, address=address or None,
                           runtime_env=runtime_env, count_macs=count_macs, faults=faults)
    return LocalExecutor(client_app, count_macs=count_macs, faults=faults)


class Progress:
    """A bar over rounds with a clock (emulated or wall) and the latest accuracy.

    Engines call :meth:`show` after each exchange; the accuracy comes from what the
    ServerApp published for ``run_key``.
    """

    def __init__(self, total: int, run_key: str, enabled: bool, label: str = "clock") -> None:
        self.run_key = run_key
        self.label = label
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="round", dynamic_ncols=True)
            results.subscribe(run_key, self._on_publish)
        self.done = 0
        self.t = 0.0

    def _on_publish(self, kind: str, value: Any) -> None:
        # The server evaluated a round: show its accuracy at once.
        if kind == "eval" and isinstance(value, Mapping):
            self.show(str(value.get("round", "")), float(value.get("clock_s", self.t)))

    def show(self, group_id: str, t: float) -> None:
        """Advance to the round ``group_id`` names; show ``t`` seconds and the accuracy."""
        if self.bar is None:
            return
        try:
            rnd = int(group_id)
        except ValueError:
            return
        self.t = t
        evals = results.collect(self.run_key).get("eval", [])
        acc = evals[-1]["accuracy"] if evals else float("nan")
        if rnd > self.done:
            self.bar.update(rnd - self.done)
            self.done = rnd
        self.bar.set_postfix_str(f"{self.label} {t:,.1f}s acc {acc:.3f}")

    def __call__(self, grid: FleetGrid) -> None:
        if grid.state.spans:
            self.show(grid.state.spans[-1].group_id, grid.clock.now)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    backend: str | None = None,
    actors: int | None = None,
    ray_address: str | None = None,
    client_app: ClientApp | None = None,
    server_app: ServerApp | None = None,
    resume: bool = False,
) -> RunResult:
    """Run ``cfg`` on tinyfleet's engine and write results to ``out_dir`` (if given).

    With ``out_dir`` every batch of client results is journaled there (``sim.journal``)
    as it arrives, so that a killed run continues with ``resume=True`` (``tinyfleet
    resume DIR``) and ends bit-identical to an uninterrupted one.
    """
    from clients.client_app import app as default_client_app
    from sim.server_app import app as default_server_app

    _quiet_flower(False)
    # One torch thread per task, as in every Ray actor: tiny per-device models run
    # fastest so, and results do not depend on where a task ran.
    torch.set_num_threads(1)
    t_wall = time.perf_counter()
    run_key = uuid.uuid4().hex
    run_config = cfg.to_run_config()
    run_config["tinyfleet.run-key"] = run_key
    if out_dir is not None:
        run_config["tinyfleet.out"] = str(out_dir)
    profiles = assign_profiles(cfg.client.fleet.mix, cfg.client.fleet.size, cfg.seed)
    slots = make_slots(profiles, cfg.seed, cfg.client.fleet.link_spread)
    if "continual" in cfg.doc:
        # Continual learning on data streams has its own pair of apps.
        from clients.continual_app import app as default_client_app
        from sim.continual_server import app as default_server_app
    if "perception" in cfg.doc:  # perception on video streams with PASS (issue 6 A3)
        from clients.perception_app import app as default_client_app
        from sim.perception_server import app as default_server_app
    if "split" in cfg.doc:  # split training with compressed features and gradients
        from clients.split import app as default_client_app
        from sim.split_server import app as default_server_app
    capp = client_app or default_client_app
    faults = cfg.faults
    if faults.kill_actor_round:
        marker = Path(out_dir) / ".faults" if out_dir is not None else Path(
            tempfile.mkdtemp(prefix="tinyfleet-faults-"))
        faults = dataclasses.replace(faults, marker_dir=str(marker))

    # Refuse (or throttle the actors of) a run that would not fit this machine's memory.
    plan = check_resources(cfg, backend=backend or cfg.engine.backend,
                           actors=cfg.engine.actors if actors is None else actors)
    if plan.throttled:
        log.warning("%s", plan.describe())

    def make_executor() -> Any:
        return _executor(
            capp,
            backend or cfg.engine.backend,
            plan.actors,
            cfg.engine.ray_address if ray_address is None else ray_address,
            faults=faults if faults.active else None,
        )

    executor: Any
    if out_dir is not None:
        executor = JournaledExecutor(_open_journal(cfg, Path(out_dir), resume), make_executor)
    else:
        executor = make_executor()
    bar = Progress(cfg.rounds, run_key, progress)
    results.publish(run_key, "start", time.time())
    grid = FleetGrid(capp, slots, seed=cfg.seed, run_config=run_config, executor=executor,
                     availability=_availability(cfg), on_progress=bar)
    try:
        run_server_app(server_app or default_server_app, grid, run_config, cfg.seed)
    finally:
        bar.close()
        grid.shutdown()
    wall_s = time.perf_counter() - t_wall
    collected = results.collect(run_key)
    results.clear(run_key)
    return _finish(cfg, grid, collected, wall_s, out_dir)


def _open_journal(cfg: ExperimentConfig, out: Path, resume: bool) -> Journal:
    """The run's journal in ``out``; refuse to mix an interrupted run with a new one."""
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / ".journal")
    run_file = out / "run.json"
    if resume:
        if not run_file.is_file():
            raise ConfigError(f"resume: {out} holds no run (no run.json)")
        return journal
    if len(journal) and not (out / "summary.json").is_file():
        raise ConfigError(
            f"--out {out}: holds an interrupted run; continue it with `tinyfleet resume "
            f"{out}`, or choose another folder (or delete this one)"
        )
    journal.clear()
    for stale in ("summary.json", "rounds.csv", "devices.csv"):
        (out / stale).unlink(missing_ok=True)
    atomic_write(run_file, json.dumps({"doc": cfg.doc, "source": cfg.source},
                                      sort_keys=True, default=str).encode())
    return journal


def resume_experiment(out_dir: str | Path, *, progress: bool = False,
                      backend: str | None = None, actors: int | None = None) -> RunResult:
    """Continue the run journaled in ``out_dir`` (see ``run_experiment``)."""
    out = Path(out_dir)
    run_file = out / "run.json"
    if not run_file.is_file():
        raise ConfigError(f"resume: {out} holds no run (no run.json)")
    saved = json.loads(run_file.read_text())
    cfg = from_doc(saved["doc"], saved.get("source", ""))
    return run_experiment(cfg, out, progress=progress, backend=backend, actors=actors,
                          resume=True)


def _finish(
    cfg: ExperimentConfig,
    grid: FleetGrid,
    collected: Mapping[str, list[Any]],
    wall_s: float,
    out_dir: str | Path | None,
) -> RunResult:
    devices = results.device_rows(grid.state.records)
    evals = collected.get("eval", [])
    rounds = results.round_rows(devices, grid.state.spans, evals)
    final = (collected.get("final") or [None])[-1]
    acc = [float(r["accuracy"]) for r in rounds if r["accuracy"] != ""]
    summary: dict[str, Any] = {
        "final_accuracy": acc[-1] if acc else None,
        "best_accuracy": max(acc) if acc else None,
        "rounds": cfg.rounds,
        "emulated_time_s": grid.clock.now,
        "wall_time_s": wall_s,
        "energy_j": sum(float(d["energy_j"]) for d in devices),
        "bytes_up": sum(int(d["bytes_up"]) for d in devices),
        "bytes_down": sum(int(d["bytes_down"]) for d in devices),
        "trainings": sum(d["message_type"] == "train" for d in devices),
        "stragglers": sum(int(r["stragglers"]) for r in rounds),
        "failures": sum(int(r["failures"]) for r in rounds),
        "dropouts": sum(int(r["dropouts"]) for r in rounds),
        "by_device_class": results.by_device_class(devices),
        "fleet": dict(sorted(_count(d.profile.name for d in grid.slots.values()).items())),
        "engine": {"name": "tinyfleet", "workers": grid.executor.num_workers,
                   "replayed_calls": getattr(grid.executor, "replayed", 0),
                   "actors_replaced": int(getattr(grid.executor, "replaced", 0))},
        "provenance": results.provenance(cfg.hash(), cfg.seed),
        "config": cfg.source,
    }
    out = results.write_run(out_dir, rounds, devices, summary, final)
    return RunResult(rounds, devices, summary, final, out, grid)


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    backend_name: str = "ray",
    backend_config: Mapping[str, Any] | None = None,
    enable_tf_gpu_growth: bool = False,
    verbose_logging: bool = False,
    run_config: Mapping[str, Any] | None = None,
    *,
    fleet: Mapping[str, float] | Sequence[str] | None = None,
    seed: int = 0,
    availability: Availability | None = None,
    num_actors: int | None = None,
    ray_address: str | None = None,
    count_macs: bool = False,
) -> FleetGrid:
    """Drop-in for ``flwr.simulation.run_simulation`` on tinyfleet's engine.

    Parameters
    ----------
    server_app, client_app, num_supernodes, backend_name, backend_config,
    enable_tf_gpu_growth, verbose_logging, run_config
        As in Flower. ``backend_name`` ``"ray"`` runs the ClientApps in Ray actors
        (``backend_config["client_resources"]["num_cpus"]`` is honoured as CPUs per actor
        by sizing the pool); ``"local"`` runs them in this process.
    fleet : dict or list, optional
        A mix of profile shares (``{"rpi4": 0.5, "jetson-nano": 0.5}``) or one profile name
        per node. Default: every node an ``rpi4``.
    seed : int
        Seeds node sampling (Flower's global ``random``), message ids and every task.
    availability : Availability, optional
        When nodes are online.
    count_macs : bool
        Run the app under ``clients.mods.device_cost_mod``: device compute times from the
        MACs the app really executes (deterministic) instead of scaled host time.

    Returns
    -------
    FleetGrid
        The grid after the run: its ``state.records`` is the per-message ledger and
        ``clock.now`` the emulated time.
    """
    del enable_tf_gpu_growth
    _quiet_flower(verbose_logging)
    if isinstance(fleet, Mapping):
        profiles = assign_profiles(fleet, num_supernodes, seed)
    elif fleet is not None:
        profiles = list(fleet)
        if len(profiles) != num_supernodes:
            raise ValueError(f"fleet: {len(profiles)} profiles for {num_supernodes} nodes")
    else:
        profiles = ["rpi4"] * num_supernodes
    actors = num_actors
    if actors is None and backend_config:
        cpus = float(backend_config.get("client_resources", {}).get("num_cpus", 1) or 1)
        actors = max(1, int((os.cpu_count() or 1) / cpus))
    torch.set_num_threads(1)
    executor = _executor(client_app, "ray" if backend_name == "ray" else "local",
                         actors or 0, ray_address or "", count_macs)
    grid = FleetGrid(client_app, make_slots(profiles, seed), seed=seed,
                     run_config=dict(run_config or {}), executor=executor,
                     availability=availability)
    try:
        run_server_app(server_app, grid, dict(run_config or {}), seed)
    finally:
        grid.shutdown()
    return grid


def ledger(grid: FleetGrid) -> list[ReplyRecord]:
    """The per-message records of a finished run."""
    return list(grid.state.records)
