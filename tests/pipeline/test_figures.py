"""The report's figures: PNGs that depend on their data only, drawn even when there is none."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.figures import fid_vs_nfe_png, guidance_tradeoff_png

ROWS = [
    {"method": "ddpm", "nfe": 1000.0, "fid": 5.0},
    {"method": "ddim50", "nfe": 50.0, "fid": 8.0},
]
FAMILY = {
    "ddim, 50 steps": [
        {"guidance": 2.0, "fid": 12.0, "class_accuracy": 0.95},
        {"guidance": 0.0, "fid": 8.0, "class_accuracy": 0.7},
    ]
}


def pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))


def test_figures_are_deterministic_pngs() -> None:
    assert fid_vs_nfe_png(ROWS, 2.0, 400) == fid_vs_nfe_png(ROWS, 2.0, 400)
    assert guidance_tradeoff_png(FAMILY, 2.0) == guidance_tradeoff_png(FAMILY, 2.0)


def test_the_data_and_the_floor_change_the_picture() -> None:
    base = pixels(fid_vs_nfe_png(ROWS, 2.0))
    assert not np.array_equal(base, pixels(fid_vs_nfe_png(ROWS, None)))
    assert not np.array_equal(base, pixels(fid_vs_nfe_png(ROWS[:1], 2.0)))
    tradeoff = pixels(guidance_tradeoff_png(FAMILY, 2.0))
    assert tradeoff.shape == base.shape
    assert not np.array_equal(tradeoff, pixels(guidance_tradeoff_png(FAMILY, None)))


def test_error_bars_and_the_floor_interval_are_drawn() -> None:
    with_bars = [{**r, "fid_ci_low": r["fid"] - 2, "fid_ci_high": r["fid"] + 2} for r in ROWS]
    plain = pixels(fid_vs_nfe_png(ROWS, (2.0, 2.0, 2.0)))
    assert not np.array_equal(plain, pixels(fid_vs_nfe_png(with_bars, (2.0, 2.0, 2.0))))
    assert not np.array_equal(plain, pixels(fid_vs_nfe_png(ROWS, (2.0, 1.0, 3.0))))


def test_nothing_to_plot_still_gives_a_figure() -> None:
    empty = pixels(guidance_tradeoff_png({}, None))
    assert empty.shape == pixels(guidance_tradeoff_png(FAMILY, 2.0)).shape
    assert empty.min() < 128  # the title and the note are drawn
    assert pixels(guidance_tradeoff_png({"x": []}, 1.0)).shape == empty.shape
    no_points = [{"method": "skipped", "nfe": None, "fid": None}]
    assert pixels(fid_vs_nfe_png(no_points, None)).shape == empty.shape
