""".ci/run: a browser that cannot be installed fails CI (CI=true) and only warns elsewhere.

The script runs with a PATH of stand-ins: ``make`` records that the tests would run,
``apt-get`` fails as an offline install does, ``chromium`` is present or not.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_ci(tmp_path: Path, *, ci: bool, browser: bool) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    stand_ins = {"make": 'echo "make $*"', "apt-get": "exit 100"}
    if browser:
        stand_ins["chromium"] = "exit 0"
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    if ci:
        env["CI"] = "true"
    return subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "run")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_missing_browser_fails_under_ci(tmp_path: Path) -> None:
    result = run_ci(tmp_path, ci=True, browser=False)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CI=true but no chromium"), lines
    assert "make" not in result.stdout  # the tests did not run


def test_missing_browser_only_warns_outside_ci(tmp_path: Path) -> None:
    result = run_ci(tmp_path, ci=False, browser=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: could not install chromium; the browser tests will be skipped"
    ]
    assert result.stdout.splitlines() == ["make test"]


@pytest.mark.parametrize("ci", [True, False])
def test_a_present_browser_runs_the_tests_quietly(tmp_path: Path, ci: bool) -> None:
    result = run_ci(tmp_path, ci=ci, browser=True)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == ["make test"]
