"""Atomic saves, weights-only loads, corrupt-file fallback and pruning."""

from __future__ import annotations

import os

import pytest
import torch

from diffusion_core import checkpoint as ckpt_mod
from diffusion_core.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    require_keys,
    save_atomic,
)


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((3,), float(step)), "cfg": {"lr": 0.1, "tags": ["a"]}}


def test_round_trip_of_tensors_and_plain_types(tmp_path):
    path = save_atomic(_state(5), tmp_path / "sub" / "c.pt")
    got = load_checkpoint(path)
    assert got["step"] == 5 and got["cfg"] == {"lr": 0.1, "tags": ["a"]}
    assert torch.equal(got["w"], torch.full((3,), 5.0))
    assert os.listdir(tmp_path / "sub") == ["c.pt"]  # no temporary file left behind


def test_failed_serialisation_keeps_the_old_file(tmp_path):
    path = save_atomic(_state(1), tmp_path / "c.pt")
    with pytest.raises(Exception):  # noqa: B017 - lambdas cannot be pickled
        save_atomic({"bad": lambda: 0}, path)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_failed_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_atomic(_state(1), tmp_path / "c.pt")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_atomic(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = save_atomic(_state(1), tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="c.pt .50 bytes.: truncated or corrupt") as err:
        load_checkpoint(path)
    assert "re-create it" in str(err.value) and "\n" not in str(err.value)


def test_missing_keys_say_what_to_do(tmp_path):
    require_keys({"a": 1}, tmp_path / "m.pt", ["a"])
    with pytest.raises(CheckpointError, match="m.pt lacks model_config, ema: .*re-create it"):
        require_keys({"a": 1}, tmp_path / "m.pt", ["a", "model_config", "ema"])


def test_saved_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_atomic(_state(1), tmp_path / "c.pt")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        save_atomic(_state(2), path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    save_atomic([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


class Opaque:
    pass


def test_objects_other_than_plain_types_are_refused_on_load(tmp_path):
    save_atomic({"obj": Opaque()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_checkpoint(tmp_path / "c.pt")
    message = str(err.value)
    assert "\n" not in message and "do not load it with weights_only=False" in message
    assert "Re-running" not in message  # torch's advice to disable the check is not passed on


def test_latest_skips_unreadable_and_falls_back(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (10, 20, 30):
        save_atomic(_state(step), tmp_path / checkpoint_name(step))
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")  # other names are ignored
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000030.pt"
    newest = tmp_path / "ckpt-00000030.pt"
    newest.write_bytes(newest.read_bytes()[:-20])
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000020.pt"


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 12, 100):  # numeric, not lexical, order
        save_atomic(_state(step), tmp_path / checkpoint_name(step))
    save_atomic(_state(0), tmp_path / "model.pt")
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == [checkpoint_name(s) for s in (1, 2, 3)]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [12, 100]
    assert (tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)
