"""Atomic writes and provenance records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _pipeline_helpers import tiny_raw

from pipeline.config import validate_params
from pipeline.files import (
    atomic_path,
    file_digest,
    provenance,
    run_context,
    write_json,
    write_provenance,
    write_text,
)
from pipeline.params_digest import params_hash


def test_write_json_round_trips_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.json"
    write_json(path, {"n": 3, "p": Path("x/y")})
    assert json.loads(path.read_text()) == {"n": 3, "p": "x/y"}


def test_outputs_get_the_permissions_open_would_give(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "shared.json", {"a": 1})
        with atomic_path(tmp_path / "report.md") as tmp:
            tmp.write_text("# r")
        for name in ("shared.json", "report.md"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name  # not mkstemp's 0600
    finally:
        os.umask(old)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    write_text(path, "good")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_unserialisable_json_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}


def test_file_digest_is_sha256(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert file_digest(path) == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_provenance_is_deterministic_and_goes_to_a_sidecar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DVC_STAGE", "sample@ddim5")
    monkeypatch.chdir(tmp_path)
    params = validate_params(tiny_raw())
    record = provenance(params, extra_key=1)
    assert record["params_hash"] == params_hash(params)
    assert record["seed"] == params.seed
    assert record["dvc_stage"] == "sample@ddim5"
    assert {"python", "torch", "numpy"} <= set(record["versions"])
    assert record["extra_key"] == 1
    # no commit, time or host: a re-run writes the same bytes
    assert not {"git_commit", "created", "host"} & set(record)
    path = write_provenance("sample@ddim5", params, extra_key=1)
    first = path.read_bytes()
    write_provenance("sample@ddim5", params, extra_key=1)
    assert path == Path("provenance/sample@ddim5.json") and path.read_bytes() == first
    assert {"git.commit", "created", "host"} <= set(run_context())  # for MLflow tags only
