"""Human-readable units for messages and reports.

Convention: binary multiples written the JEDEC way, 1 KB = 1024 bytes, 1 MB = 1024 KB,
1 GB = 1024 MB, so an STM32F746's 327,680 bytes of SRAM read "320 KB" as in its datasheet.
"""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("B", "KB", "MB", "GB", "TB")


def format_bytes(n: float) -> str:
    """Format a byte count with binary multiples: ``format_bytes(327680) == "320 KB"``.

    Three significant digits at most: ``"1.9 MB"``, ``"12.3 MB"``, ``"320 KB"``; values
    under 1 KB are whole bytes (``"512 B"``). A trailing ``.0`` is dropped.
    """
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{sign}{int(round(value))} B"
    text = f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{sign}{text} {_UNITS[unit]}"
