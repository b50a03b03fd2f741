"""The user-facing script tests/test_hybrid_ep.py runs end to end (small sizes, 2 gloo ranks on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hybrid_ep

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_hybrid_ep.py")


def script_env() -> dict[str, str]:
    """Returns: this environment with the package the tests import (installed or the source tree) first on
    PYTHONPATH, so the script runs the same hybrid_ep rather than whichever copy its own directory finds."""
    package_root = os.path.dirname(os.path.dirname(hybrid_ep.__file__))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))


def test_script_runs_and_writes_json(tmp_path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--num-processes",
            "2",
            "--backend",
            "gloo",
            "--num-tokens",
            "40",
            "--hidden",
            "128",
            "--num-tests",
            "3",
            "--num-warmups",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=script_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[correctness] uniform: dispatch/combine/layout as expected (2 ranks)" in proc.stdout
    assert "[bench] combine BF16:" in proc.stdout
    results = json.loads(out.read_text())["results"]
    for label in ("dispatch BF16 (cached handle)", "dispatch FP8 (cached handle)", "combine BF16"):
        assert results[label]["bytes"] > 0 and results[label]["time_us"] > 0


def test_script_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--num-processes", "3", "--backend", "gloo", "--num-experts", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        env=script_env(),
    )
    assert proc.returncode == 2 and "--num-experts 8 must be divisible by --num-processes 3" in proc.stderr


def test_script_runs_without_pytest(tmp_path) -> None:
    """The README's main job installs requirements.txt only: the script must not need pytest."""
    code = (
        "import runpy, sys\n"
        "sys.modules['pytest'] = None  # any import of pytest now fails\n"
        f"sys.argv = [{SCRIPT!r}, '--num-processes', '2', '--backend', 'gloo', '--num-tokens', '16', "
        "'--hidden', '128', '--num-tests', '2', '--num-warmups', '1', '--skip-check']\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=script_env()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[bench] combine BF16:" in proc.stdout
