"""Per-device state that outlives a task: each node's ``Context.state``, memory or disk.

An idle device costs the engine only its slot (ids, a profile reference, a link factor)
and, once it has trained, its state. Small states stay in memory; a state larger than
``spill_bytes`` (error-feedback residuals, replay buffers, optimizer state) is written to
its own file under ``directory`` and read back when the device is selected again, so
that 10,000 devices with model-sized state fit a small machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["NodeStore"]


class NodeStore:
    """A byte store keyed by node id, spilling large values to disk.

    Parameters
    ----------
    directory : Path, optional
        Where spilled states live (a temporary folder by default).
    spill_bytes : int
        States of at least this many bytes go to disk.
    """

    def __init__(self, directory: Path | None = None, spill_bytes: int = 64 * 1024) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tinyfleet-store-")
            directory = Path(self._tmp.name)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spill_bytes = spill_bytes
        self._mem: dict[int, bytes] = {}
        self._disk: set[int] = set()

    def _path(self, node_id: int) -> Path:
        return self.dir / f"{node_id}.state"

    def get(self, node_id: int) -> bytes | None:
        """The stored bytes of ``node_id``, or ``None``."""
        if node_id in self._mem:
            return self._mem[node_id]
        if node_id in self._disk:
            return self._path(node_id).read_bytes()
        return None

    def put(self, node_id: int, data: bytes) -> None:
        """Store ``data`` for ``node_id`` (an empty value stores nothing)."""
        self._mem.pop(node_id, None)
        if node_id in self._disk and len(data) < self.spill_bytes:
            self._path(node_id).unlink(missing_ok=True)
            self._disk.discard(node_id)
        if not data:
            return
        if len(data) >= self.spill_bytes:
            self._path(node_id).write_bytes(data)
            self._disk.add(node_id)
        else:
            self._mem[node_id] = data

    def memory_bytes(self) -> int:
        """Bytes held in memory."""
        return sum(len(v) for v in self._mem.values())

    def disk_nodes(self) -> int:
        """How many nodes' states are on disk."""
        return len(self._disk)

    def close(self) -> None:
        """Remove a temporary store."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
