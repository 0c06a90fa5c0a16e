"""clients.int8: INT8 training (Octo): conv/linear forward and backward on int8 kernels.

Lives here: ``prepare`` (the model transform), the int8 layers, their numerics and
kernels, LAC, and ``export`` of trained int8 weights. Must not: touch the fleet or Flower.
"""

from clients.int8.export import export, exported_size_bytes
from clients.int8.functional import Int8Config, int8_conv2d, int8_linear
from clients.int8.modules import Int8Conv2d, Int8Linear, lac_penalty
from clients.int8.prepare import UNSUPPORTED, prepare

__all__ = [
    "prepare",
    "export",
    "exported_size_bytes",
    "lac_penalty",
    "Int8Linear",
    "Int8Conv2d",
    "Int8Config",
    "int8_linear",
    "int8_conv2d",
    "UNSUPPORTED",
]
