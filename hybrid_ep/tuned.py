"""Tuned configs: the results files `python -m hybrid_ep.tune` writes, and the lookup behind
`Buffer.get_dispatch_config` / `Buffer.get_combine_config`.

A results file `results_ep<N>.json` holds, for N ranks, the best `Config` the tuner found for each op (dispatch BF16,
dispatch FP8, combine), overall and at each SM count it tried. Where it is looked for, first match wins:

1. `HYBRID_EP_TUNED_CONFIG`: a results file, or a directory holding `results_ep<N>.json`; `off` (or 0/false/no)
   turns tuned files off;
2. the per-user cache, `~/.cache/hybrid_ep/results_ep<N>.json` (`$XDG_CACHE_HOME/hybrid_ep/...` where set), which
   `python -m hybrid_ep.tune --install` fills;
3. else the built-in table, `config.RECOMMENDED_CONFIGS`.

The SM count of a returned Config is always the one asked for (`Buffer.num_sms`, as in DeepEP); the chunk and ring
sizes come from the tuner's best at that SM count, or at the nearest SM count it tried (the smaller of two equally
near). A file that cannot be used (unreadable, not JSON, another format, a config `Config` rejects, another rank
count) gives one `TunedConfigWarning` naming the file and the reason, and the built-in table serves: a stale cache
must not stop a job. The file is read again when it changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

from . import envs
from .config import Config, recommended_config

#: The `format` field of a results file this module reads and the tuner writes.
FORMAT = "hybrid_ep.tune/1"
#: The ops a results file holds, each timed as `python -m hybrid_ep.tune` times it.
OPS = ("dispatch_bf16", "dispatch_fp8", "combine")
#: The Config fields a results entry names, in the constructor's order.
CONFIG_FIELDS = (
    "num_sms",
    "num_max_nvl_chunked_send_tokens",
    "num_max_nvl_chunked_recv_tokens",
    "num_max_rdma_chunked_send_tokens",
    "num_max_rdma_chunked_recv_tokens",
)
#: The op names `config_for` (and the built-in table) take, and the results-file op each reads.
LOOKUP_OPS = {"dispatch": "dispatch_bf16", "dispatch_fp8": "dispatch_fp8", "combine": "combine"}


class TunedConfigWarning(UserWarning):
    """A tuned results file was found but cannot be used; the built-in configs serve instead."""


@dataclasses.dataclass(frozen=True)
class TunedTable:
    """The usable content of one results file.

    Arguments:
        path: the file it was read from.
        num_ranks: the rank count it was tuned for.
        best: per op of OPS, the best Config overall.
        by_num_sms: per op of OPS, the best Config at each SM count tried (may be empty).
    """

    path: str
    num_ranks: int
    best: dict[str, Config]
    by_num_sms: dict[str, dict[int, Config]]

    def config(self, op: str, num_sms: int) -> Config:
        """Returns: a Config of `op` (one of OPS) with `num_sms` SMs and the tuned chunk sizes nearest to it."""
        per_sms = self.by_num_sms.get(op) or {}
        if per_sms:
            nearest = min(per_sms, key=lambda s: (abs(s - num_sms), s))
            source = per_sms[nearest]
        else:
            source = self.best[op]
        return with_num_sms(source, num_sms)


def with_num_sms(config: Config, num_sms: int) -> Config:
    """Returns: `config` with `num_sms` SMs and the same chunk and ring sizes."""
    return Config(
        num_sms,
        config.num_max_nvl_chunked_send_tokens,
        config.num_max_nvl_chunked_recv_tokens,
        config.num_max_rdma_chunked_send_tokens,
        config.num_max_rdma_chunked_recv_tokens,
    )


def results_file_name(num_ranks: int) -> str:
    """Returns: the name of the results file for `num_ranks` ranks, `results_ep<num_ranks>.json`."""
    return f"results_ep{num_ranks}.json"


def default_path(num_ranks: int) -> str:
    """Returns: the per-user cache path of the results file for `num_ranks` ranks."""
    return os.path.join(envs.cache_dir(), results_file_name(num_ranks))


def config_entry(config: Config, gbps: float, time_us: float) -> dict[str, Any]:
    """Returns: one results-file entry: `{"config": {field: value}, "gbps": ..., "time_us": ...}`."""
    return {
        "config": {name: getattr(config, name) for name in CONFIG_FIELDS},
        "gbps": float(gbps),
        "time_us": float(time_us),
    }


def make_results(
    num_ranks: int,
    best: dict[str, dict[str, Any]],
    by_num_sms: dict[str, dict[int, dict[str, Any]]],
    **metadata: Any,
) -> dict[str, Any]:
    """Returns: the JSON object of a results file (checked by `parse`).

    Arguments:
        num_ranks: the rank count tuned for.
        best: per op of OPS, a `config_entry`.
        by_num_sms: per op of OPS, per SM count, a `config_entry`.
        metadata: more top-level fields (device, workload, mode, ...), written as given.
    """
    data: dict[str, Any] = {"format": FORMAT, "num_ranks": num_ranks, **metadata}
    data["best"] = {op: best[op] for op in OPS if op in best}
    data["by_num_sms"] = {op: {str(s): e for s, e in sorted(by_num_sms.get(op, {}).items())} for op in OPS}
    parse(data, "<results being written>")
    return data


def parse(data: Any, path: str) -> TunedTable:
    """Checks the JSON object of a results file. Returns: its TunedTable. Raises ValueError naming every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        errors.append(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    num_ranks = data.get("num_ranks")
    if not _is_int(num_ranks) or num_ranks < 1:
        errors.append(f"num_ranks is {num_ranks!r}, expected a positive int")

    def entry(where: str, value: Any) -> Config | None:
        if not isinstance(value, dict) or not isinstance(value.get("config"), dict):
            errors.append(f"{where} must be an object with a 'config' object")
            return None
        for name in ("gbps", "time_us"):
            figure = value.get(name)
            if not isinstance(figure, (int, float)) or isinstance(figure, bool) or not math.isfinite(figure):
                errors.append(f"{where}.{name} is {figure!r}, expected a finite number")
        fields = value["config"]
        unknown = sorted(set(fields) - set(CONFIG_FIELDS))
        missing = [name for name in CONFIG_FIELDS if name not in fields]
        if unknown or missing:
            errors.append(f"{where}.config: missing {missing}, unknown {unknown}")
            return None
        try:
            return Config(**fields)
        except ValueError as exc:
            errors.append(f"{where}.config: {exc}")
            return None

    best: dict[str, Config] = {}
    best_data = data.get("best")
    if not isinstance(best_data, dict):
        errors.append("best must be an object with the ops " + ", ".join(OPS))
    else:
        for op in OPS:
            if op not in best_data:
                errors.append(f"best.{op} is missing")
                continue
            config = entry(f"best.{op}", best_data[op])
            if config is not None:
                best[op] = config

    by_num_sms: dict[str, dict[int, Config]] = {}
    per_sms_data = data.get("by_num_sms", {})
    if not isinstance(per_sms_data, dict):
        errors.append("by_num_sms must be an object")
        per_sms_data = {}
    for op, table in per_sms_data.items():
        if op not in OPS or not isinstance(table, dict):
            errors.append(f"by_num_sms.{op}: expected one of {', '.join(OPS)} holding an object")
            continue
        by_num_sms[op] = {}
        for key, value in table.items():
            try:
                num_sms = int(key)
            except ValueError:
                errors.append(f"by_num_sms.{op}: key {key!r} is not an SM count")
                continue
            config = entry(f"by_num_sms.{op}.{key}", value)
            if config is not None:
                if config.num_sms != num_sms:
                    errors.append(f"by_num_sms.{op}.{key}: config.num_sms is {config.num_sms}")
                by_num_sms[op][num_sms] = config
    if errors:
        raise ValueError("; ".join(errors))
    return TunedTable(path, int(num_ranks), best, by_num_sms)  # type: ignore[arg-type]


def load(path: str) -> TunedTable:
    """Reads and checks a results file. Raises OSError when it cannot be read, ValueError when it is not a usable
    results file (the message says why)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    return parse(data, path)


# path -> ((mtime_ns, size), TunedTable or None when unusable); a warning is given once per version of a file.
_cache: dict[str, tuple[tuple[int, int], TunedTable | None]] = {}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, TunedConfigWarning, stacklevel=4)


def _fallback_note() -> str:
    return (
        "using the built-in configs (hybrid_ep.config.RECOMMENDED_CONFIGS); rerun `python -m hybrid_ep.tune`, "
        "or set HYBRID_EP_TUNED_CONFIG=off to silence this"
    )


def find_results_file(num_ranks: int) -> str | None:
    """Returns: the results file consulted for `num_ranks` ranks, or None (the built-in table serves)."""
    setting = envs.tuned_config()
    if setting == "":
        return None
    if setting is None:
        path = default_path(num_ranks)
        return path if os.path.isfile(path) else None
    if os.path.isdir(setting):
        path = os.path.join(setting, results_file_name(num_ranks))
        return path if os.path.isfile(path) else None
    if os.path.exists(setting):
        return setting
    _warn_once(f"HYBRID_EP_TUNED_CONFIG={setting}: no such file or directory; {_fallback_note()}")
    return None


def lookup(num_ranks: int) -> TunedTable | None:
    """Returns: the tuned table that serves `num_ranks` ranks, or None (the built-in table serves). Warns, once per
    version of a file, when the file found cannot be used."""
    path = find_results_file(num_ranks)
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError as exc:
        _warn_once(f"tuned config file {path} cannot be read ({exc}); {_fallback_note()}")
        return None
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(path)
    if cached is not None and cached[0] == stamp:
        table = cached[1]
    else:
        try:
            table = load(path)
        except (OSError, ValueError) as exc:
            _warn_once(f"tuned config file {path} is not usable: {exc}; {_fallback_note()}")
            table = None
        _cache[path] = (stamp, table)
    if table is not None and table.num_ranks != num_ranks:
        _warn_once(
            f"tuned config file {path} was tuned for {table.num_ranks} ranks, not {num_ranks}; {_fallback_note()}"
        )
        return None
    return table


def config_for(op: str, num_ranks: int, num_sms: int) -> Config:
    """The Config `Buffer.get_dispatch_config` / `get_combine_config` return.

    Arguments:
        op: "dispatch" (tuned on BF16), "dispatch_fp8" or "combine".
        num_ranks: ranks of the group.
        num_sms: SMs of the returned Config (`Buffer.num_sms`).
    Returns:
        the tuned Config (see the module docstring for where it is looked for), else the built-in one.
    """
    if op not in LOOKUP_OPS:
        raise ValueError(f"op={op!r}: expected one of {', '.join(LOOKUP_OPS)}")
    table = lookup(num_ranks) if _is_int(num_ranks) and num_ranks > 0 else None
    if table is not None:
        return table.config(LOOKUP_OPS[op], num_sms)
    return recommended_config(op, num_ranks, num_sms)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
