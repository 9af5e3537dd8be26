"""Fixtures for the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from _pipeline_helpers import tiny_raw, write_params


@pytest.fixture
def tiny_params_file(tmp_path: Path) -> Path:
    """A tiny, valid params.yaml in a temporary directory."""
    return write_params(tmp_path / "params.yaml", tiny_raw())
