"""Real measurements on real hardware: compute wall time, peak memory, energy if metered.

When a ClientApp runs on a real device (node config ``measure = true`` or the environment
variable ``TINYFLEET_MEASURE=1`` on the SuperNode), it measures instead of emulating:

- ``compute-s``: wall time of the handler's compute (``time.perf_counter``);
- ``peak-mem-bytes``: the peak resident set of the ClientApp process
  (``resource.getrusage``; Flower starts one ``flwr-clientapp`` process per message, so this
  is that message's peak, Python and torch included);
- ``energy-j``: the energy over the compute window where the platform meters it, else NaN
  (unknown). Sources, probed in this order:

  * Jetson INA3221 power monitors: ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*``
    (JetPack 5.1+/6, ``in*_input`` mV times ``curr*_input`` mA) or
    ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input`` (JetPack 4, mW).
    The module's input rail (``VDD_IN``/``POM_5V_IN``) is used when present, else the sum
    of the rails;
  * a Raspberry Pi 5's PMIC, ``vcgencmd pmic_read_adc`` (the sum of volts times amps of
    its rails; the USB/peripheral 5 V load is not metered);
  * Intel RAPL package counters, ``/sys/class/powercap/intel-rapl:*/energy_uj`` (a host's
    CPU package only), where readable.

Power sources are sampled on a thread (``interval_s``) and integrated with the trapezoid
rule; counters are read at both ends. What a source covers is named in ``energy_source``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "EnergySource",
    "Meter",
    "measure_enabled",
    "parse_pmic_adc",
    "peak_rss_bytes",
    "process_age_s",
    "probe_energy_source",
]

MEASURE_ENV = "TINYFLEET_MEASURE"
_TRUE = {"1", "true", "yes", "on"}


def measure_enabled(node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None
                    ) -> bool:
    """Whether this node measures (node config ``measure``, or ``TINYFLEET_MEASURE``)."""
    value = node_config.get("measure")
    if value is None:
        value = (os.environ if environ is None else environ).get(MEASURE_ENV, "")
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``; NaN where unknown).

    Flower starts a ClientApp process per message: its age when the handler begins is
    the device's start-up cost (interpreter, imports, app install), which the server
    otherwise sees only as part of the round trip.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return math.nan


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass(frozen=True)
class EnergySource:
    """Something that tells power (``read_w``) or an energy counter (``read_j``)."""

    name: str
    read_w: Callable[[], float] | None = None
    read_j: Callable[[], float] | None = None


def _read_float(path: Path) -> float:
    return float(path.read_text().strip())


def _pick_rails(rails: dict[str, Callable[[], float]]) -> tuple[str, Callable[[], float]]:
    """The module input rail when there is one (it includes the others), else the sum."""
    for label, fn in rails.items():
        if label.upper() in ("VDD_IN", "POM_5V_IN") or label.upper().endswith("_IN"):
            return label, fn
    fns = list(rails.values())
    return "+".join(rails), lambda: sum(f() for f in fns)


def _jetson_hwmon(root: Path) -> EnergySource | None:
    rails: dict[str, Callable[[], float]] = {}
    for hw in sorted(root.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
        for volt in sorted(hw.glob("in*_input")):
            idx = volt.name[2:-6]
            curr = hw / f"curr{idx}_input"
            label_p = hw / f"in{idx}_label"
            if not curr.exists() or not label_p.exists():
                continue
            label = label_p.read_text().strip()
            if not label or label.upper().startswith("NC"):
                continue

            def read(v: Path = volt, c: Path = curr) -> float:
                return _read_float(v) * _read_float(c) / 1e6  # mV * mA -> W

            rails[label] = read
    if not rails:
        return None
    label, fn = _pick_rails(rails)
    return EnergySource(f"jetson-ina3221:{label}", read_w=fn)


def _jetson_iio(root: Path) -> EnergySource | None:
    rails: dict[str, Callable[[], float]] = {}
    for dev in sorted(root.glob("bus/i2c/drivers/ina3221x/*/iio:device*")):
        for pw in sorted(dev.glob("in_power*_input")):
            idx = pw.name[len("in_power"):-len("_input")]
            label_p = dev / f"rail_name_{idx}"
            label = label_p.read_text().strip() if label_p.exists() else f"rail{idx}"

            def read(p: Path = pw) -> float:
                return _read_float(p) / 1e3  # mW -> W

            rails[label] = read
    if not rails:
        return None
    label, fn = _pick_rails(rails)
    return EnergySource(f"jetson-ina3221x:{label}", read_w=fn)


_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([0-9.eE+-]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> float:
    """Watts from ``vcgencmd pmic_read_adc`` output: the sum over rails of volts x amps.

    Raises
    ------
    ValueError
        When no rail has both a current and a voltage reading.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    both = sorted(set(amps) & set(volts))
    if not both:
        raise ValueError("pmic_read_adc: no rail with both a current and a voltage")
    return sum(amps[r] * volts[r] for r in both)


def _pi_pmic(command: Sequence[str]) -> EnergySource | None:
    if shutil.which(command[0]) is None:
        return None

    def read() -> float:
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=2,
                             check=True).stdout
        return parse_pmic_adc(out)

    try:
        read()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return EnergySource("rpi-pmic", read_w=read)


def _rapl(root: Path) -> EnergySource | None:
    zones = [z for z in sorted(root.glob("class/powercap/intel-rapl:*"))
             if z.name.count(":") == 1 and (z / "energy_uj").exists()]
    if not zones:
        return None
    try:
        for z in zones:
            _read_float(z / "energy_uj")
    except (OSError, ValueError):
        return None  # present but not readable (recent kernels: root only)
    ranges = []
    for z in zones:
        try:
            ranges.append(_read_float(z / "max_energy_range_uj"))
        except (OSError, ValueError):
            ranges.append(math.inf)
    last: list[float | None] = [None] * len(zones)
    total = [0.0]

    def read() -> float:
        # A monotonic joule count, unwrapping each zone's counter.
        for i, z in enumerate(zones):
            v = _read_float(z / "energy_uj")
            prev = last[i]
            if prev is not None:
                total[0] += (v - prev if v >= prev else v + ranges[i] - prev) / 1e6
            last[i] = v
        return total[0]

    read()
    return EnergySource("rapl:" + "+".join(z.name for z in zones), read_j=read)


def probe_energy_source(
    sysfs: str | Path = "/sys",
    pmic_command: Sequence[str] = ("vcgencmd", "pmic_read_adc"),
) -> EnergySource | None:
    """The first energy source this platform offers (see the module docstring), or None."""
    root = Path(sysfs)
    for probe in (_jetson_hwmon, _jetson_iio):
        try:
            src = probe(root)
        except (OSError, ValueError):
            src = None
        if src is not None:
            try:
                src.read_w() if src.read_w else None
            except (OSError, ValueError):
                continue
            return src
    src = _pi_pmic(pmic_command)
    if src is not None:
        return src
    try:
        return _rapl(root)
    except (OSError, ValueError):
        return None


class Meter:
    """Measures one compute window: ``with Meter() as m: ...`` then ``m.wall_s`` etc.

    Parameters
    ----------
    source : EnergySource or None or "auto"
        Where energy comes from; ``"auto"`` probes the platform, None measures no energy.
    interval_s : float
        Sampling period of a power source.
    """

    def __init__(self, source: EnergySource | None | str = "auto",
                 interval_s: float = 0.05) -> None:
        self.source = probe_energy_source() if source == "auto" else source
        if isinstance(self.source, str):
            raise ValueError(f"source: expected an EnergySource, None or 'auto', got "
                             f"{self.source!r}")
        self.interval_s = interval_s
        self.wall_s = 0.0
        self.energy_j = math.nan
        self.peak_mem_bytes = 0
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._j0 = 0.0

    @property
    def energy_source(self) -> str:
        """The name of the energy source, or ``"unknown"``."""
        return self.source.name if isinstance(self.source, EnergySource) else "unknown"

    def _sample(self) -> None:
        assert isinstance(self.source, EnergySource) and self.source.read_w is not None
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            self._samples.append((time.perf_counter(), self.source.read_w()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> Meter:
        src = self.source
        if isinstance(src, EnergySource) and src.read_w is not None:
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="tinyfleet-power")
            self._thread.start()
        elif isinstance(src, EnergySource) and src.read_j is not None:
            self._j0 = src.read_j()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.wall_s = time.perf_counter() - self._t0
        src = self.source
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self.energy_j = _trapezoid(self._samples)
        elif isinstance(src, EnergySource) and src.read_j is not None:
            try:
                self.energy_j = src.read_j() - self._j0
            except (OSError, ValueError):
                self.energy_j = math.nan
        self.peak_mem_bytes = peak_rss_bytes()


def _trapezoid(samples: Sequence[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return math.nan
    return float(sum((t1 - t0) * (p0 + p1) / 2
                     for (t0, p0), (t1, p1) in zip(samples, samples[1:], strict=False)))
