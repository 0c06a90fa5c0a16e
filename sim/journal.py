"""The run journal: every batch of client results, saved atomically as it arrives.

A user's ``ServerApp`` cannot be re-entered at round k (a strategy's ``start`` is one loop
holding its own state). So instead of pickling the server's state, the engine journals
what it cannot recompute: the results of each executor call (reply bytes, the nodes'
updated ``Context`` bytes, host seconds). On resume, the ServerApp runs again from the
start with the same seed; its first calls are answered from the journal without any
client retraining, and everything else (node sampling, aggregation, the virtual clock,
per-device state, the ledger and the results) is recomputed exactly as the first time.
When the journal runs out, the run continues live. A call interrupted by a kill (even
``kill -9``) left no entry, so it runs again live with the same seeds: the final results
and model are bit-identical to an uninterrupted run.

Each entry is written to a temporary file, fsynced, and renamed into place (then the
folder is fsynced), so an entry is either wholly there or absent.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devices.errors import TinyFleetError
from sim.executor import Task, TaskResult

__all__ = ["Journal", "JournaledExecutor", "JournalMismatchError", "atomic_write"]


class JournalMismatchError(TinyFleetError):
    """The journal does not belong to this run (config or code changed since)."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Numbered, atomically written entries in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):
            stale.unlink()
        names = sorted(p.name for p in self.dir.glob("*.pkl"))
        # Only a gap-free prefix counts (entries are written in order).
        self._n = 0
        while f"{self._n:08d}.pkl" in names:
            self._n += 1

    def __len__(self) -> int:
        return self._n

    def get(self, k: int) -> tuple[list[int], list[TaskResult], int]:
        """Entry ``k``: the call's node ids, their results, and actors lost during it."""
        with (self.dir / f"{k:08d}.pkl").open("rb") as f:
            return pickle.load(f)  # the run's own files, written by this class

    def append(self, node_ids: list[int], results: list[TaskResult], lost: int = 0) -> None:
        """Save the next entry atomically."""
        atomic_write(self.dir / f"{self._n:08d}.pkl",
                     pickle.dumps((node_ids, results, lost), protocol=pickle.HIGHEST_PROTOCOL))
        self._n += 1

    def clear(self) -> None:
        """Remove every entry."""
        for p in self.dir.glob("*.pkl"):
            p.unlink()
        self._n = 0


class JournaledExecutor:
    """Answer calls from the journal while it lasts, then run live and journal.

    The live executor is created only when first needed, so a replay starts no Ray.
    """

    def __init__(self, journal: Journal, make_inner: Callable[[], Any]) -> None:
        self.journal = journal
        self._make_inner = make_inner
        self._inner: Any = None
        self.calls = 0
        self.replayed = 0
        self.replaced = 0

    @property
    def inner(self) -> Any:
        """The live executor (created on first use)."""
        if self._inner is None:
            self._inner = self._make_inner()
        return self._inner

    @property
    def num_workers(self) -> int:
        """Workers of the live executor (0 while only replaying)."""
        return self.inner.num_workers if self._inner is not None else 0

    def run(self, tasks: Sequence[Task]) -> list[TaskResult]:
        """Results of ``tasks``: from entry ``calls`` if journaled, else live."""
        k = self.calls
        self.calls += 1
        ids = [t.node_id for t in tasks]
        if k < len(self.journal):
            node_ids, results, lost = self.journal.get(k)
            if node_ids != ids:
                raise JournalMismatchError(
                    f"journal entry {k} was for nodes {node_ids[:5]}..., this run asks "
                    f"{ids[:5]}...: the config, seed or code changed since the run began"
                )
            self.replayed += 1
            self.replaced += lost
            return results
        before = int(getattr(self.inner, "replaced", 0))
        results = self.inner.run(tasks)
        lost = int(getattr(self.inner, "replaced", 0)) - before
        self.replaced += lost
        self.journal.append(ids, results, lost)
        return results

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()
