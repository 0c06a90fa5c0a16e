"""Resource guard: will a run fit this machine's memory? Refuse or throttle it up front.

A fleet run that does not fit is otherwise killed by the operating system halfway (the
OOM killer takes a Ray worker, or the driver, hours in). :func:`check_resources` estimates,
before anything starts, the bytes the driver and each Ray worker will hold at the peak of a
round, compares them with the memory available now, and either returns a
:class:`ResourcePlan` (possibly with fewer actors than asked for) or raises
:class:`~devices.errors.ConfigError` saying what the run needs and what would make it fit.

What the estimate counts, per round (the engine materializes a whole round at once):

- the *driver*: a fixed cost of running at all (``_DRIVER_RUN_BYTES``, measured); for
  each sampled device its serialized instruction, its serialized reply and the
  deserialized reply the strategy aggregates (``_DRIVER_COPIES`` model-sized copies,
  measured) and its Context (the run config); the global model and the aggregate; the
  fleet's data (the server evaluates on the test set; the local backend trains here too),
  the idle cost of every device (its slot, ``_IDLE_DEVICE_BYTES``), per-device node state
  (error-feedback residuals, up to the store's spill size, when updates are compressed),
  the message ledger (``_RECORD_BYTES`` per message) and, on Ray, the object store's copy
  of every instruction and reply;
- each *Ray worker*: the measured footprint of a worker with torch, Flower and the app
  loaded (``RAY_WORKER_BYTES``), its own copy of the fleet's data, the tasks of one batch
  (instruction and reply each) and one training's working set (the trained copy, its
  gradients and optimizer state, the deserialized instruction: ``_TRAIN_COPIES`` model
  sizes, plus the device's data shard);
- Ray's own daemons once (``RAY_BASE_BYTES``) when this process starts Ray.

The figures are estimates with a safety margin (``_MARGIN``), not measurements of the run;
they exist to turn an out-of-memory kill into a clear message before the run starts.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.errors import ConfigError
from sim.config import ExperimentConfig

__all__ = [
    "RAY_BASE_BYTES",
    "RAY_WORKER_BYTES",
    "ResourcePlan",
    "available_memory_bytes",
    "check_resources",
    "measure_ray_worker",
]

# Measured on this project's host (2 cores, 24 GB, Linux, torch 2.13 CPU, ray 2.55.1,
# flwr 1.42) with ``.venv/bin/python -m sim.guard``: one Ray actor that imported torch,
# Flower and clients.client_app, loaded configs/default.toml's data and model and trained
# one batch had RSS 470.2-470.6 MiB, PSS 331-335 MiB, private 309 MiB (two runs, two
# actors each). RSS counts shared library pages in every process, so it is what a worker
# costs at worst; we plan with it.
RAY_WORKER_BYTES = 471 * 2**20
# Ray's daemons (GCS server, raylet, monitors) started by ray.init on one machine: summed
# RSS 333.6-334.8 MiB by the same command (MemAvailable fell 250-660 MiB across ray.init,
# too noisy on a shared host to plan with).
RAY_BASE_BYTES = 335 * 2**20

# Instruction and reply serialized, reply deserialized. Measured: the driver of
# configs/default.toml with resnet18 (43.7 MB of state) grew 128 MB per extra sampled
# device (10 -> 20 devices a round: ``python -m sim.guard compare`` below), 2.9 copies.
_DRIVER_COPIES = 3
# What a run adds to the driver whatever its size (Flower's server loop and lazy imports,
# torch's autograd and allocator arenas, the host calibration): configs/default.toml
# (a 72 KB model) grew the driver by 181.6 MiB, by the same command.
_DRIVER_RUN_BYTES = 180 * 2**20
_TRAIN_COPIES = 4  # trained copy + gradients + optimizer state + deserialized instruction
_IDLE_DEVICE_BYTES = 300  # a DeviceSlot and its profile reference (tracemalloc: ~250 B)
_RECORD_BYTES = 700  # one ReplyRecord in the ledger (tracemalloc: ~655 B)
_SPILL_BYTES = 64 * 1024  # sim.store.NodeStore keeps smaller node states in memory
_MARGIN = 1.2  # Python allocator slack and what the estimate does not see
_GB = 1024**3


@dataclass(frozen=True)
class ResourcePlan:
    """What a run will hold in memory, and with how many actors it runs.

    Attributes
    ----------
    backend : str
        ``"local"`` or ``"ray"``.
    actors : int
        Ray actors to start (``requested_actors`` or fewer when throttled; 0 when local).
    requested_actors : int
        The actors asked for (``engine.actors``; 0 on Ray means one per CPU).
    model_bytes : int
        Bytes of one copy of the model's state (what one message carries).
    data_bytes : int
        Bytes of the fleet's data as loaded in one process.
    sampled : int
        Devices trained per round.
    driver_bytes : int
        Estimated peak bytes of the driver process (and Ray's object store).
    worker_bytes : int
        Estimated peak bytes of one Ray worker (0 when local).
    available_bytes : int
        Memory available to the run.
    throttled : bool
        Whether ``actors`` is below ``requested_actors`` so that the run fits.
    """

    backend: str
    actors: int
    requested_actors: int
    model_bytes: int
    data_bytes: int
    sampled: int
    driver_bytes: int
    worker_bytes: int
    available_bytes: int
    throttled: bool = False

    @property
    def total_bytes(self) -> int:
        """Driver plus every worker (with Ray's daemons), the figure compared to memory."""
        base = RAY_BASE_BYTES if self.backend == "ray" and self.actors else 0
        return self.driver_bytes + self.actors * self.worker_bytes + base

    def describe(self) -> str:
        """One line for a log: what is needed, what is there, and how many actors run."""
        where = f"{self.actors} Ray actors" if self.backend == "ray" else "the local backend"
        note = f" (throttled from {self.requested_actors})" if self.throttled else ""
        return (f"needs about {self.total_bytes / _GB:.2f} GB with {where}{note} "
                f"(driver {self.driver_bytes / _GB:.2f} GB, per worker "
                f"{self.worker_bytes / _GB:.2f} GB; model {self.model_bytes / 1024:.0f} KB "
                f"x {self.sampled} devices a round); {self.available_bytes / _GB:.2f} GB "
                f"available")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Limit minus usage (reclaimable page cache added back) of this process's cgroup."""
    root = Path("/sys/fs/cgroup")
    for limit_f, usage_f, stat_f, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
         "memory/memory.stat", "total_inactive_file"),  # v1
    ):
        limit, usage = _read_int(root / limit_f), _read_int(root / usage_f)
        if limit is None or usage is None or limit >= 2**60:  # "max" or unlimited
            continue
        cache = 0
        try:
            for line in (root / stat_f).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(0, limit - usage + cache)
    return None


def available_memory_bytes() -> int:
    """Memory a new run may use now: ``MemAvailable``, or the cgroup's room if smaller."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:  # not Linux: fall back to total physical memory
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = _cgroup_available()
    return min(avail, room) if room is not None else avail


def _data_bytes_upfront(cfg: ExperimentConfig) -> int:
    """The data's size as loaded (float32), known without loading it."""
    d = cfg.client.data
    if d.source == "synthetic":
        # x as float32 plus the interpolation, tint and noise intermediates of building it
        return 4 * d.synthetic_size * d.channels * d.image_size**2 * 4
    if d.source == "npz":
        try:
            with zipfile.ZipFile(d.path) as zf:
                raw = sum(i.file_size for i in zf.infolist())
        except (OSError, zipfile.BadZipFile):
            return 0  # unreadable: the data loader names the problem
        return 2 * raw  # the arrays, and x cast to float32 (at most as wide again)
    return 1797 * 8 * 8 * 4 * 2  # scikit-learn's digits (and their train/test copies)


def _model_and_data(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """Model state bytes, loaded data bytes and one device's shard bytes."""
    from clients.client_app import build_training_model, fleet_data

    try:
        model = build_training_model(cfg.client)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.args: cannot build {cfg.client.model.name!r} with "
                          f"{cfg.client.model.args} ({exc})") from exc
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    data = fleet_data(cfg.client)
    data_bytes = sum(a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    x, y = data.device_data(0)  # one shard: cheap, and the size every device's has
    return int(model_bytes), int(data_bytes), int(x.nbytes + y.nbytes)


def _sampled(cfg: ExperimentConfig) -> int:
    s, size = cfg.strategy, cfg.client.fleet.size
    over = float(getattr(s, "overcommit", 1.0))  # strategies.OverCommit samples more
    train = max(int(size * min(1.0, s.fraction_train * over)), s.min_train)
    evaluate = int(size * s.fraction_evaluate)
    return min(size, max(train, evaluate))


def check_resources(
    cfg: ExperimentConfig,
    *,
    backend: str,
    actors: int,
    available_bytes: int | None = None,
) -> ResourcePlan:
    """Estimate a run's peak memory; refuse it, or throttle its actors, if it would not fit.

    Parameters
    ----------
    cfg : ExperimentConfig
        The validated experiment.
    backend : str
        ``"local"`` (the apps run in this process) or ``"ray"``.
    actors : int
        Ray actors asked for (0: one per CPU, as ``sim.executor.RayExecutor`` does).
    available_bytes : int, optional
        Memory to plan against; default :func:`available_memory_bytes` (tests inject a
        small figure).

    Returns
    -------
    ResourcePlan
        The estimate, with ``actors`` reduced (``throttled``) when fewer make it fit.

    Raises
    ------
    ConfigError
        If the run would not fit even with one actor (or on the local backend), naming
        what it needs, what is available, and which fields to reduce.
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"engine.backend: expected 'local' or 'ray', got {backend!r}")
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 0:
        raise ConfigError(f"engine.actors: expected an integer >= 0, got {actors!r}")
    avail = available_memory_bytes() if available_bytes is None else int(available_bytes)
    remote = backend == "ray" and bool(cfg.engine.ray_address)
    # 0 on a cluster stays 0 (one per CPU there); here it means one per CPU of this host
    requested = 0 if backend == "local" else actors if remote else actors or (os.cpu_count() or 1)
    upfront = _data_bytes_upfront(cfg)
    if upfront * _MARGIN > avail:
        _refuse(cfg, int(upfront * _MARGIN), avail, "for the data alone: data.synthetic_size, "
                "data.image_size, data.channels or the .npz file", actors)
    model_bytes, data_bytes, shard = _model_and_data(cfg)
    sampled = _sampled(cfg)
    size = cfg.client.fleet.size
    compressed = bool((cfg.doc.get("compression") or {}).get("uplink"))
    state = min(model_bytes, _SPILL_BYTES) if compressed else 0  # error-feedback residuals
    per_round = sampled * (_DRIVER_COPIES * model_bytes + 2 * len(str(cfg.doc)))
    ledger = _RECORD_BYTES * cfg.rounds * sampled * (1 + (cfg.strategy.fraction_evaluate > 0))
    driver = (_DRIVER_RUN_BYTES + per_round + 2 * model_bytes + data_bytes
              + size * (_IDLE_DEVICE_BYTES + state) + ledger)
    if backend == "local":
        driver += _TRAIN_COPIES * model_bytes + shard
    elif not remote:
        driver += sampled * 2 * model_bytes  # Ray's object store: instructions and replies

    def plan(n: int) -> ResourcePlan:
        worker = 0
        if backend == "ray" and not remote:
            per_batch = -(-sampled // (2 * max(1, n)))  # sim.executor's batch size
            worker = (RAY_WORKER_BYTES + data_bytes + per_batch * 2 * model_bytes
                      + _TRAIN_COPIES * model_bytes + shard)
        return ResourcePlan(backend, n, requested, model_bytes, data_bytes, sampled,
                            int(driver * _MARGIN), int(worker * _MARGIN), avail,
                            throttled=n < requested)

    if remote:  # the workers live on the cluster's machines: only the driver is ours
        result = plan(requested)
        if result.driver_bytes > avail:
            _refuse(cfg, result.driver_bytes, avail, "for the driver; the workers are remote",
                    actors)
        return result
    for n in range(requested, 0, -1) if backend == "ray" else [0]:
        result = plan(n)
        if result.total_bytes <= avail:
            return result
    parts = f"driver {result.driver_bytes / _GB:.2f} GB"
    if backend == "ray":
        parts += (f" + 1 Ray actor {result.worker_bytes / _GB:.2f} GB + Ray's daemons "
                  f"{RAY_BASE_BYTES / _GB:.2f} GB")
    _refuse(cfg, result.total_bytes, avail,
            f"{parts}; model {model_bytes / 2**20:.1f} MB x {sampled} devices a round", actors)
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse(cfg: ExperimentConfig, need: int, avail: int, what: str, actors: int) -> None:
    raise ConfigError(
        f"this run needs about {need / _GB:.2f} GB ({what}) but the machine has "
        f"{avail / _GB:.2f} GB available; reduce fleet.size (now {cfg.client.fleet.size}), "
        f"strategy.fraction_train (now {cfg.strategy.fraction_train}) or min_train, "
        f"engine.actors (now {actors}), or the model (model.name "
        f"{cfg.client.model.name!r}, model.args)"
    )


def _proc_memory(pid: int) -> dict[str, int]:
    """RSS, PSS and private bytes of a process, from /proc."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[-1] == "kB":
            out[key.strip()] = int(parts[0]) * 1024
    return {"rss": out.get("Rss", 0), "pss": out.get("Pss", 0),
            "private": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)}


class _Probe:
    """A Ray actor that loads what a tinyfleet worker loads and trains one batch."""

    def load(self, config: str) -> dict[str, int]:
        import torch

        from clients.client_app import app, build_training_model, fleet_data
        from sim.config import load_config

        del app
        torch.set_num_threads(1)
        cfg = load_config(config)
        model = build_training_model(cfg.client)
        x, y = fleet_data(cfg.client).device_data(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:4])),
                                                 torch.from_numpy(y[:4]))
        loss.backward()
        opt.step()
        return _proc_memory(os.getpid())


def measure_ray_worker(config: str | Path = "configs/default.toml", workers: int = 2) -> dict:
    """Measure Ray's daemons and one loaded worker (the figures behind the constants).

    Returns MemAvailable's drop across ``ray.init`` and across starting ``workers``
    actors, and each actor's RSS, PSS and private bytes.
    """
    import ray

    before = available_memory_bytes()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        after_init = available_memory_bytes()
        node = ray._private.worker.global_worker.node
        daemons = [info.process.pid for infos in node.all_processes.values()
                   for info in infos if info.process is not None]
        daemon_rss = sum(_proc_memory(pid)["rss"] for pid in daemons)
        probe = ray.remote(num_cpus=1)(_Probe)
        actors: list[Any] = [probe.remote() for _ in range(workers)]
        mems = ray.get([a.load.remote(str(config)) for a in actors])
        after_actors = available_memory_bytes()
    finally:
        ray.shutdown()
    return {
        "ray_init_drop": before - after_init,
        "ray_daemons_rss": daemon_rss,
        "actors_drop_per_actor": (after_init - after_actors) // workers,
        "actor_rss": max(m["rss"] for m in mems),
        "actor_pss": max(m["pss"] for m in mems),
        "actor_private": max(m["private"] for m in mems),
    }


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def compare_with_run(config: str | Path, **overrides: Any) -> dict[str, Any]:
    """Run ``config`` on the local backend; the driver's estimate beside its measured peak.

    Meant for a fresh process (``python -m sim.guard compare CONFIG key=value...``): the
    peak RSS (``VmHWM``) less the RSS before the run is what the run added.
    """
    from sim.config import load_config
    from sim.runner import run_experiment

    cfg = load_config(config).with_overrides(**overrides)
    before = _status_bytes("VmRSS")
    plan = check_resources(cfg, backend="local", actors=0)
    run_experiment(cfg, backend="local")
    grown = _status_bytes("VmHWM") - before
    return {"estimate_bytes": plan.driver_bytes, "measured_growth_bytes": grown,
            "ratio": plan.driver_bytes / max(grown, 1), "plan": plan.describe()}


def _main(argv: list[str]) -> None:
    if argv and argv[0] == "compare":
        def value(v: str) -> Any:
            for cast in (int, float):
                try:
                    return cast(v)
                except ValueError:
                    pass
            return v

        over = {k: value(v) for k, _, v in (a.partition("=") for a in argv[2:])}
        for k, v in compare_with_run(argv[1], **over).items():
            print(f"{k:24s} {v / 2**20:8.1f} MiB" if k.endswith("bytes") else f"{k:24s} {v}")
        return
    result = measure_ray_worker()
    for k, v in result.items():
        print(f"{k:24s} {v / 2**20:8.1f} MiB")
    print(f"{'ceil(rss)':24s} {math.ceil(result['actor_rss'] / 2**20)} MiB")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
