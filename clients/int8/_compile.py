"""Fusing the elementwise quantize work with ``torch.compile``, and falling back cleanly.

Eager quantization (scale, divide, add noise, floor, clamp, cast: one pass each) costs
more than the int8 GEMM saves, so the quantize functions of :mod:`clients.int8.quant` run
fused under ``torch.compile(dynamic=True)``: one graph for all batch sizes, so a smaller
last batch does not recompile (inputs are flattened to 1-D, so rank never varies either).

Compiled code is cached on disk by inductor in ``TORCHINDUCTOR_CACHE_DIR``. If that is
unset when this module is imported it is set to ``<tmp>/tinyfleet-inductor``, one cache
shared by every process of the machine (simulated clients, tests, benchmarks): the first
process compiles (seconds per graph on 2 cores), later ones load.

Where compilation is unavailable (no C++ compiler, dynamo unsupported) or fails, the
eager function runs instead and one warning (``warnings`` and the ``clients.int8`` logger)
says so; it is never silently slow.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["resolve_compile", "fused", "compile_log", "one_kernel"]

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tinyfleet-inductor")
)

_log = logging.getLogger("clients.int8")
_compiled: dict[tuple[str, Callable[..., Any]], Callable[..., Any]] = {}
_failed: set[str] = set()
_warned: set[str] = set()
#: (function name, seconds) of each first call that compiled, for benchmarks/reports.
compile_log: list[tuple[str, float]] = []


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_compile(compile: bool | str) -> bool:
    """Whether to compile: ``True``/``False`` as given; ``"auto"`` when dynamo and a C++
    compiler are available (warning once when they are not)."""
    if compile is True or compile is False:
        return compile
    if compile != "auto":
        raise ValueError(f"compile: expected True, False or 'auto', got {compile!r}")
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.config as inductor_config
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        msg = f"clients.int8: torch.compile unavailable ({exc}); quantize ops run eager (slow)"
        _warn_once("auto", msg)
        return False
    cxx = inductor_config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, tuple) else (cxx,)) if c]
    if not any(shutil.which(str(c)) for c in names):
        _warn_once(
            "auto", "clients.int8: no C++ compiler for inductor; quantize ops run eager (slow)"
        )
        return False
    return True


def _fresh_copy(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo keeps its compiled graphs (and counts
    recompiles against its limit of 8) per code object, so each variant gets a fresh one."""
    code = fn.__code__.replace()
    new = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return new


def _as_one_kernel(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run ``fn`` out of sight of the active dispatch mode and show it copies of the
    outputs only.

    A fused quantize kernel reads its inputs and writes its outputs; the eager version's
    per-op temporaries (the int64 hash-noise arrays above all) never exist on a device.
    The cost model's step tracer is a dispatch mode: this way it counts one call as its
    outputs, which is what a device running the fused kernel holds.
    """
    import torch
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils._pytree import tree_leaves, tree_map

    with _disable_current_modes():
        out = fn(*args, **kwargs)
    # Show the tracer the reads (an alias of each input: same storage, no bytes) and the
    # writes (fresh outputs, filled out of its sight); the host's intermediates stay unseen.
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            torch.ops.aten.alias.default(t)

    def shown(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        with _disable_current_modes():
            new.copy_(t)
        return new

    return tree_map(shown, out)


def one_kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as is, except under a dispatch mode, where it runs as one kernel: the
    tracer sees its outputs only.

    For the quantize functions when they run uncompiled, and for the int8 GEMM and
    convolution kernels with their FP32 rescale: a device's kernel
    (CMSIS-NN, TinyEngine, oneDNN) rescales each int32 accumulator tile in its epilogue and
    never holds the whole int32 result (nor a whole im2col buffer) that the host's
    composition of ``_int_mm``, casts and multiplies does.
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode

    def run(*args: Any, **kwargs: Any) -> Any:
        if _dispatch_mode() is not None:
            return _as_one_kernel(fn, args, kwargs)
        return fn(*args, **kwargs)

    return run


def fused(name: str, fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``fn`` compiled with ``torch.compile(dynamic=True)``, or ``fn`` itself.

    The compiled callable is built once per ``(name, fn)`` and shared by every layer;
    callers put the static options of a variant in ``name`` (each name gets its own code
    object, so variants do not eat each other's recompile budget). A failure at compile
    or run time switches that name to eager for the rest of the process, with one
    warning.
    """
    if not enabled or name in _failed:
        return one_kernel(fn)
    key = (name, fn)
    if key not in _compiled:
        import torch
        from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode

        compiled = torch.compile(_fresh_copy(fn, name), dynamic=True, fullgraph=True)
        state = {"first": True}

        def run(*args: Any, **kwargs: Any) -> Any:
            # One graph per call signature: the same grad mode and requires_grad=False
            # inputs whether called from a forward, a backward or plain code (each would
            # otherwise be a recompile, and past dynamo's limit, silent eager).
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            with torch.no_grad():
                return _call(*args, **kwargs)

        def _call(*args: Any, **kwargs: Any) -> Any:
            if _dispatch_mode() is not None:
                # Under a tracing dispatch mode (the cost model's step tracer) dynamo
                # cannot run; that call goes eager, as one fused kernel would look,
                # without disabling compilation for the training that follows.
                return _as_one_kernel(fn, args, kwargs)
            if name in _failed:
                return fn(*args, **kwargs)
            try:
                if state["first"]:
                    t0 = time.perf_counter()
                    out = compiled(*args, **kwargs)
                    compile_log.append((name, time.perf_counter() - t0))
                    state["first"] = False
                    return out
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compile failure must fall back
                _failed.add(name)
                _warn_once(
                    name,
                    f"clients.int8: torch.compile of {name} failed ({type(exc).__name__}: "
                    f"{str(exc)[:200]}); running it eager (slow)",
                )
                return fn(*args, **kwargs)

        _compiled[key] = run
    return _compiled[key]
