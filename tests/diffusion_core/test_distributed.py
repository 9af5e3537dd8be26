"""Process-group set-up: single process without torchrun, two gloo processes with it."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffusion_core import distributed as d

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_without_torchrun(no_torchrun):
    info = d.setup_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == torch.device("cpu")
    assert not d.is_distributed()
    assert d.broadcast_object({"a": 1}) == {"a": 1}
    assert d.all_gather_object(3) == [3]
    d.barrier()
    d.cleanup()


def test_default_device_follows_cuda(no_torchrun):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert d.setup_distributed().device.type == expected
    assert d.DistInfo.single().device.type == expected


def test_bad_torchrun_environment_is_rejected(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        d.setup_distributed(device="cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        d.setup_distributed(device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    info = d.setup_distributed(device="cpu")
    got = {
        "rank": info.rank,
        "world": info.world_size,
        "main": info.is_main,
        "backend": torch.distributed.get_backend(),
        "bcast": d.broadcast_object(f"from {info.rank}"),
        "gather": d.all_gather_object(info.rank * 10),
    }
    d.barrier()
    d.cleanup()
    got["after_cleanup"] = d.is_distributed()
    queue.put(got)


def test_two_gloo_processes_share_objects():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"])
    for rank, r in enumerate(results):
        assert r["rank"] == rank and r["world"] == 2 and r["main"] == (rank == 0)
        assert r["backend"] == "gloo"
        assert r["bcast"] == "from 0" and r["gather"] == [0, 10]
        assert r["after_cleanup"] is False
