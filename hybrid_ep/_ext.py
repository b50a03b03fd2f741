"""Loads the compiled extension `hybrid_ep._C` once and says what it holds.

`import hybrid_ep` works without the extension (a pure-Python install, or a build that failed): the reference
backend then serves every call that needs no kernel, and a call that needs one raises an error that says how to
build it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

try:
    _C: Any = importlib.import_module("hybrid_ep._C")
    _import_error: str | None = None
except ImportError as exc:  # recorded and reported by build_info() and require_extension()
    _C = None
    _import_error = f"{type(exc).__name__}: {exc}"

BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` from the source tree, on a machine with the CUDA toolkit "
    "(set CUDA_HOME if nvcc is not on PATH); `hybrid_ep.build_info()` shows what the installed package holds"
)

_NO_FEATURES = {
    "layout": False,
    "intranode": False,
    "internode": False,
    "low_latency": False,
    "nvshmem": False,
    "nvml_topology": False,
    "multinode_build": False,
}


def has_extension() -> bool:
    """Returns: whether `hybrid_ep._C` was imported."""
    return _C is not None


def require_extension(feature: str) -> Any:
    """Returns the extension module, or raises RuntimeError naming `feature` and how to build the extension."""
    if _C is None:
        raise RuntimeError(
            f"hybrid_ep: {feature} needs the compiled extension hybrid_ep._C, which is not available "
            f"({_import_error}); {BUILD_HINT}"
        )
    return _C


def build_info() -> dict:
    """What the installed package was built with.

    Returns:
        dict with `extension` (bool: whether `_C` imported), `error` (why not, or None), `version`, and, from the
        extension, `arch_list`, `cuda_version`, `torch_version` and `features` (dict of bool: which kernels were
        compiled in). Without the extension every feature reads False.
    """
    if _C is None:
        return {"extension": False, "error": _import_error, "version": __version__, "features": dict(_NO_FEATURES)}
    info = dict(_C.build_info())
    info["extension"] = True
    info["error"] = None
    info.setdefault("version", __version__)
    return info
