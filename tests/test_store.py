"""The per-device store keeps small states in memory and spills large ones to disk."""

from pathlib import Path

from sim.store import NodeStore


def test_store_spills_and_reads_back(tmp_path: Path) -> None:
    s = NodeStore(tmp_path, spill_bytes=100)
    s.put(1, b"small")
    s.put(2, b"x" * 500)
    assert s.get(1) == b"small" and s.get(2) == b"x" * 500 and s.get(3) is None
    assert s.disk_nodes() == 1 and s.memory_bytes() == 5
    assert (tmp_path / "2.state").stat().st_size == 500
    s.put(2, b"tiny")  # shrinks back into memory, file removed
    assert s.get(2) == b"tiny" and s.disk_nodes() == 0 and not (tmp_path / "2.state").exists()
    s.put(1, b"")
    assert s.get(1) is None
