"""The one place where hybrid_ep reads environment variables (docs/env.md lists them all)."""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_flag(name: str, default: bool) -> bool:
    """Reads a boolean variable; raises ValueError naming the variable for anything but 1/0/true/false/yes/no/on/off."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of 1/0/true/false/yes/no/on/off")


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    """Reads an integer variable; raises ValueError naming the variable when it is not an integer or too small."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"environment variable {name}={value}: must be >= {minimum}")
    return value


def check_inputs() -> bool:
    """HYBRID_EP_CHECK_INPUTS (default on): value checks that need a device-to-host read (expert index range,
    layout consistency). Shape, dtype and device checks always run; value checks are skipped during CUDA graph
    capture whatever this says."""
    return env_flag("HYBRID_EP_CHECK_INPUTS", True)


def timeout_secs() -> float:
    """HYBRID_EP_TIMEOUT_SECS (default 100): how long a device-side wait on a peer may last before the kernel prints
    which peer it waited for and traps."""
    raw = os.environ.get("HYBRID_EP_TIMEOUT_SECS")
    if raw is None or raw.strip() == "":
        return 100.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable HYBRID_EP_TIMEOUT_SECS={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"environment variable HYBRID_EP_TIMEOUT_SECS={value}: must be positive")
    return value


def output_arena_bytes() -> int:
    """HYBRID_EP_OUTPUT_ARENA_BYTES (default 1 GiB; 0 for none): bytes of device memory per rank, mapped by the
    NVLink peers, from which dispatch takes its output tensors so that the senders write rows straight into them.
    A dispatch whose outputs do not fit (the memory is held by earlier outputs still alive) receives through the
    rings as without an arena, which costs the receiving SMs a copy of every row."""
    return env_int("HYBRID_EP_OUTPUT_ARENA_BYTES", 1 << 30, minimum=0)


def combine_pull() -> bool:
    """HYBRID_EP_COMBINE_PULL (default on): a combine whose inputs (x, and top-k weights if given) lie in every rank's
    output arena (dispatch outputs, or `Buffer.new_combine_input`) has each rank read its tokens' copies from the
    peers directly. Off: this rank never offers its inputs, so every rank pushes rows through the rings."""
    return env_flag("HYBRID_EP_COMBINE_PULL", True)


def num_nvl_ranks() -> int | None:
    """HYBRID_EP_NUM_NVL_RANKS (default unset): ranks per NVLink domain for `Buffer` (`Buffer.num_nvl_ranks`),
    instead of what the NVML topology says. Returns: the value (a positive integer), or None when unset or empty."""
    raw = os.environ.get("HYBRID_EP_NUM_NVL_RANKS")
    if raw is None or raw.strip() == "":
        return None
    return env_int("HYBRID_EP_NUM_NVL_RANKS", 0, minimum=1)


def topo_dump_file() -> str | None:
    """HYBRID_EP_TOPO_DUMP_FILE (default unset): `hybrid_ep.topology()` writes what it probed to this path as JSON."""
    raw = os.environ.get("HYBRID_EP_TOPO_DUMP_FILE")
    return raw if raw is not None and raw.strip() != "" else None


def topo_file() -> str | None:
    """HYBRID_EP_TOPO_FILE (default unset): `hybrid_ep.topology()` loads this JSON (written through
    HYBRID_EP_TOPO_DUMP_FILE, or by hand) instead of probing NVML."""
    raw = os.environ.get("HYBRID_EP_TOPO_FILE")
    return raw if raw is not None and raw.strip() != "" else None


# Values of HYBRID_EP_TUNED_CONFIG that turn tuned files off (the built-in table only).
_TUNED_OFF = {"0", "false", "no", "off"}


def tuned_config() -> str | None:
    """HYBRID_EP_TUNED_CONFIG (default unset): a tuner results file (`results_ep<N>.json`) or a directory of them,
    read by `Buffer.get_dispatch_config` / `get_combine_config`. Returns: the path; "" when the variable turns
    tuned files off (0/false/no/off); None when unset or empty (the per-user cache is used)."""
    raw = os.environ.get("HYBRID_EP_TUNED_CONFIG")
    if raw is None or raw.strip() == "":
        return None
    if raw.strip().lower() in _TUNED_OFF:
        return ""
    return os.path.expanduser(raw.strip())


def cache_dir() -> str:
    """The per-user cache directory of hybrid_ep: `$XDG_CACHE_HOME/hybrid_ep`, or `~/.cache/hybrid_ep` when
    XDG_CACHE_HOME is unset or empty. The tuner installs its results there (`--install`)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    if not base:
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hybrid_ep")
