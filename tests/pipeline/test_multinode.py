"""Multi-node training: the train stage as two torchrun "nodes" on this machine, over loopback.

Each node is its own ``torch.distributed.run`` agent (``--nnodes=2 --nproc-per-node=1``) and
they meet through a c10d rendezvous at ``127.0.0.1:<free port>``, as two machines would meet
at the first one's address. Both run in one temporary copy of the project, as nodes sharing a
file system do. CUDA is hidden: two processes on one GPU cannot form an NCCL group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _pipeline_helpers import copy_code, tiny_raw, write_params
from mlflow.tracking import MlflowClient

from pipeline import paths, prepare
from pipeline.config import validate_params

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TIMEOUT_S = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(rank: int, port: int, run_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={run_id}",
        "--local-addr=127.0.0.1",
        "-m",
        "pipeline",
        "train",
        "--params",
        "tiny.yaml",
    ]


def run_together(
    commands: list[list[str]], cwd: Path, env: dict[str, str], timeout_s: float
) -> list[tuple[int, str]]:
    """Start every command at once; ``(exit code, output)`` of each, killed after ``timeout_s``
    (with the workers they started: each runs in its own session)."""
    logs = [cwd / f"node{i}.log" for i in range(len(commands))]
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return [(proc.wait(), log.read_text()) for proc, log in zip(procs, logs, strict=True)]


def test_train_as_two_nodes_over_loopback(tmp_path: Path) -> None:
    copy_code(tmp_path)
    raw = tiny_raw()
    raw["train"]["nproc"] = 2  # the world size: 2 nodes x 1 process
    write_params(tmp_path / "tiny.yaml", raw)
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(tmp_path):
        mp.setenv("DVC_ROOT", str(tmp_path))
        prepare.run(validate_params(raw))
    env = dict(os.environ)
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    results = run_together(
        [node_command(rank, port, run_id) for rank in (0, 1)], tmp_path, env, TIMEOUT_S
    )
    logs = [log for _, log in results]
    report = "\n".join(
        f"--- node {i} (exit {code})\n{log}" for i, (code, log) in enumerate(results)
    )
    assert [code for code, _ in results] == [0, 0], report

    assert (tmp_path / paths.MODEL).is_file()
    record = json.loads((tmp_path / paths.TRAIN_METRICS).read_text())
    assert record["steps"] == raw["train"]["steps"], report
    timing = json.loads((tmp_path / "runs/timing/train.json").read_text())
    assert timing["world_size"] == 2, report
    finished = f"trained {raw['train']['steps']} steps"
    assert sum(finished in log for log in logs) == 1, report  # rank 0 alone, on either node
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    (link,) = (tmp_path / paths.TRAIN_DIR).glob("mlflow-*.json")
    assert json.loads(link.read_text())["run_id"] == runs[0].info.run_id
