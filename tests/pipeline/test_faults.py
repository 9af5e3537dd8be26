"""Bad input and faults end in one line and the right exit code, never a traceback or an orphan.

The expensive part (``kill -9`` of a whole ``dvc repro`` at random moments, 10 seeds) is
``benchmarks/fault_kill9.py``; these tests are the fast ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _pipeline_helpers import REPO, tiny_raw, write_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline import launch
from pipeline.cli import app
from pipeline.config import Params, ParamsError, load_params
from pipeline.errors import StageError
from pipeline.locks import FolderLock, lock_path
from pipeline.params_digest import flatten

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def one_clean_line(text: str) -> bool:
    return text.count("\n") <= 1 and "Traceback" not in text


# ------------------------------------------------------------------ arbitrary params.yaml


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_yaml_is_valid_or_one_line(tmp_path_factory: Any, text: str) -> None:
    path = tmp_path_factory.mktemp("y") / "params.yaml"
    path.write_text(text)
    try:
        load_params(path)
    except ParamsError as exc:
        assert "\n" not in str(exc), str(exc)


LEAVES = sorted(flatten(tiny_raw()))
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-3, 40), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LEAVES), VALUES)
def test_any_value_for_any_key_passes_check_params_or_is_one_line(
    tmp_path_factory: Any, key: str, value: Any
) -> None:
    """Through the command line, with the run-time checks (model built on the meta device)."""
    raw = tiny_raw()
    _set(raw, key, value)
    path = write_params(tmp_path_factory.mktemp("v") / "params.yaml", raw)
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code in (0, 2), (key, value, result.output)
    if result.exit_code == 2:
        assert one_clean_line(result.stderr) and result.stderr.strip(), result.stderr
    else:
        assert isinstance(load_params(path), Params)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lr", float("inf"), "train.lr: Input should be a finite number"),
        ("train.lr", float("nan"), "train.lr: Input should be a finite number"),
        ("train.batch_size", 5000, "train.batch_size: must not exceed the"),
        ("seed", 2**63, "seed: Input should be less than"),
        ("model.base_channels", 3, "model: attention channels"),
        ("model.num_res_blocks", 396006, "model.num_res_blocks: Input should be less than"),
        # the sample stage would skip these (samplers.compatible): check-params refuses them
        # with the same rule (the sampler registry's min_steps), at validation
        ("methods.ddim5", {"sampler": "pc", "steps": 1},
         "methods.ddim5.steps: pc needs at least 2 steps (the last one is the denoising step) "
         "(got 1)"),
        ("methods.ddim5", {"sampler": "sde", "steps": 1},
         "methods.ddim5.steps: sde needs at least 2"),
        ("methods.ddim5", {"sampler": "ode_heun", "steps": 1},
         "methods.ddim5.steps: ode_heun needs at least 2"),
        ("methods.ddim5", {"sampler": "edm_heun", "steps": 1},
         "methods.ddim5.steps: edm_heun needs at least 2"),
    ],
)
def test_values_stages_refused_at_run_time_are_refused_by_check_params(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    raw = tiny_raw()
    _set(raw, key, value)
    path = write_params(tmp_path / "params.yaml", raw)
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 2
    assert message in result.stderr and one_clean_line(result.stderr)


def test_yaml_values_python_cannot_build_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 2001-13-01\n")
    with pytest.raises(ParamsError, match="invalid YAML value: month must be in 1..12"):
        load_params(path)


# -------------------------------------------------------------------- one line per failure


def _workspace(tmp_path: Path) -> Path:
    write_params(tmp_path / "params.yaml", tiny_raw())
    return tmp_path


@pytest.mark.parametrize(
    ("model_bytes", "message"),
    [
        (b"garbage", "truncated or corrupt"),
        ("missing-keys", "lacks model_config"),
        ("pickle", "refused to load"),
    ],
)
def test_bad_model_file_is_one_line_with_what_to_do(
    tmp_path: Path, model_bytes: Any, message: str
) -> None:
    root = _workspace(tmp_path)
    model = root / "runs/train/model.pt"
    model.parent.mkdir(parents=True)
    if model_bytes == "missing-keys":
        torch.save({"ema": {}}, model)
    elif model_bytes == "pickle":
        torch.save({"x": StageError("objects, not tensors")}, model)
    else:
        model.write_bytes(model_bytes)
    with contextlib.chdir(root):
        result = CliRunner().invoke(app, ["sample", "-m", "ddim5"])
    assert result.exit_code == 1
    assert message in result.stderr and "re-create it" in result.stderr
    assert one_clean_line(result.stderr)
    assert "weights_only=False" not in result.stderr.replace("do not load it with weights_only=False", "")


def test_evaluate_a_method_never_sampled_is_one_line(tmp_path: Path) -> None:
    with contextlib.chdir(_workspace(tmp_path)):
        result = CliRunner().invoke(app, ["evaluate", "-m", "ddim5"])
    assert result.exit_code == 1 and one_clean_line(result.stderr)
    assert "metrics/sample/ddim5.json is missing" in result.stderr


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import report

    def boom(params: Params) -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(report, "run", boom)
    params = str(_workspace(tmp_path) / "params.yaml")
    result = CliRunner().invoke(app, ["report", "--params", params])
    assert result.exit_code == 1 and one_clean_line(result.stderr)
    assert "unexpected ZeroDivisionError: division by zero" in result.stderr
    result = CliRunner().invoke(app, ["--debug", "report", "--params", params])
    assert isinstance(result.exception, ZeroDivisionError)


# ------------------------------------------------------------------------ checkpoint lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_training_is_refused_and_a_stale_lock_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "checkpoints"
    held = FolderLock.acquire(folder)
    with pytest.raises(StageError, match=r"in use by another training \(PID \d+ on this host\)"):
        FolderLock.acquire(folder)
    held.release()
    assert not lock_path(folder).exists()
    record = {"pid": _dead_pid(), "host": socket.gethostname()}
    lock_path(folder).write_text(json.dumps(record))
    FolderLock.acquire(folder).release()
    assert "removing the stale lock" in capsys.readouterr().out
    lock_path(folder).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(StageError, match="on elsewhere.example.*delete .*checkpoints.lock"):
        FolderLock.acquire(folder)


# --------------------------------------------------------------- launcher and parent death


def test_exit_code_mapping() -> None:
    def codes(tmp: Path, *values: int) -> Path:
        for rank, v in enumerate(values):
            (tmp / f"rank-{rank}").write_text(f"{v}\n")
        return tmp

    import tempfile

    cases = [
        ((0, None, ()), 0),
        ((1, None, (2, 2)), 2),
        ((1, None, (143, 1)), 143),
        ((1, signal.SIGINT, (130, 130)), 130),
        ((1, None, (1, 0)), 1),
        ((1, None, ()), 1),
        ((-9, None, ()), 137),
    ]
    for (rc, signum, values), expected in cases:
        with tempfile.TemporaryDirectory() as tmp:
            assert launch._exit_code(rc, signum, codes(Path(tmp), *values)) == expected


FAKE_TORCHRUN = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    status = pathlib.Path(os.environ["DIFFUSION_STATUS_DIR"])
    def stop(signum, frame):
        for rank in (0, 1):
            (status / f"rank-{rank}").write_text(str(128 + signum))
            print("stopped: interrupted", file=sys.stderr, flush=True)
        print("Traceback (most recent call last):\\n  File x\\nSignalException: 15",
              file=sys.stderr, flush=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, stop)
    if sys.argv[1] == "fail":
        for rank in (0, 1):
            (status / f"rank-{rank}").write_text("2")
            print("params.yaml: train.lr: bad", file=sys.stderr, flush=True)
        print("W0101 00:00:00.000 1 torch/distributed/elastic] noise", file=sys.stderr)
        print("Traceback (most recent call last):\\n  File x\\nChildFailedError:",
              file=sys.stderr)
        sys.exit(1)
    print("ready", flush=True)
    time.sleep(30)
    """
)


def _launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "fake_torchrun.py"
    script.write_text(FAKE_TORCHRUN)
    cmd = [sys.executable, "-m", "pipeline.launch", "--", sys.executable, str(script), mode]
    env = {k: v for k, v in ENV.items() if k != "DIFFUSION_DEBUG"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_launcher_maps_worker_codes_and_prints_each_line_once(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "fail")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err == "params.yaml: train.lr: bad\n"  # once, without torchrun's noise


def test_launcher_forwards_sigterm_and_exits_143(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "wait")
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err == "stopped: interrupted\n"


def test_launcher_refuses_bad_params_before_starting_anything(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["train"]["lr"] = -1
    path = write_params(tmp_path / "params.yaml", raw)
    cmd = [sys.executable, "-m", "pipeline.launch", "--params", str(path), "--", "false"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"{path}: train.lr: Input should be greater than 0 (got -1)\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_worker_dies_with_its_parent(tmp_path: Path) -> None:
    """The parent (think torchrun's agent) is killed with SIGKILL: the child gets SIGTERM."""
    pidfile = tmp_path / "child.pid"
    child = (
        "import os, sys, time, pathlib; from pipeline import guard; guard.die_with_parent(); "
        f"pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid())); time.sleep(60)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], env=ENV)
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break  # exited; a zombie until init reaps it
        time.sleep(0.1)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"



def test_a_one_process_job_runs_without_torchrun_and_others_keep_it():
    from pipeline.launch import direct_command

    head = ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    job = ["-m", "pipeline", "sample", "--params", "params.yaml", "--method", "ddpm"]
    assert direct_command([*head, "--nproc-per-node=1", *job]) == ["python", *job]
    two = [*head, "--nproc-per-node=2", *job]
    assert direct_command(two) == two
    multinode = ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                 "--rdzv-endpoint=host:29500", *job]
    assert direct_command(multinode) == multinode
    assert direct_command(["python", "-m", "pipeline", "train"]) == ["python", "-m", "pipeline",
                                                                     "train"]
