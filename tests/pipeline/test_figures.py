"""The report's figures: PNGs that depend on their data only, drawn even when there is none.

The content checks read the pictures back: the points and their error bars are found by their
colour (matplotlib's first colour), the floor by its dashed grey line and shaded band, and their
pixel positions must follow the data: a log NFE axis, a linear FID axis from 0, bars from
``fid_ci_low`` to ``fid_ci_high``, the floor at its value, guidance points joined in order of w.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.figures import DPI, FIGSIZE, fid_vs_nfe_png, guidance_tradeoff_png

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
# three points with asymmetric intervals: NFE a decade apart, FIDs not symmetric about the middle
BARS = [
    {"method": "a", "nfe": 10.0, "fid": 3.0, "fid_ci_low": 2.5, "fid_ci_high": 4.0},
    {"method": "b", "nfe": 100.0, "fid": 9.0, "fid_ci_low": 7.5, "fid_ci_high": 10.0},
    {"method": "c", "nfe": 1000.0, "fid": 5.0, "fid_ci_low": 4.5, "fid_ci_high": 6.0},
]
C0 = np.array([31, 119, 180])  # matplotlib's first colour: the points, bars and lines
PX = 3.0  # pixels of tolerance (pixel snapping: up to ~1.5); one FID unit is 30 px


def pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))


def rgb(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def blue(img: np.ndarray) -> np.ndarray:
    return np.abs(img - C0).sum(-1) < 60


def markers(img: np.ndarray) -> list[tuple[float, float]]:
    """(row, column) centres of the round markers, left to right (lines and bars, 2 px wide,
    vanish in a 5 x 5 opening; the 9 px markers stay)."""
    solid = ndimage.binary_opening(blue(img), np.ones((5, 5)))
    labels, n = ndimage.label(solid)
    centres = ndimage.center_of_mass(solid, labels, range(1, n + 1))
    return sorted(((float(r), float(c)) for r, c in centres), key=lambda rc: rc[1])


def affine(u: list[float], v: list[float]) -> tuple[float, float, float]:
    """Least-squares ``v = a + b u``: (a, b, largest residual)."""
    b, a = np.polyfit(u, v, 1)
    return a, b, float(np.max(np.abs(a + b * np.asarray(u) - np.asarray(v))))


def dashed_grey_row(img: np.ndarray, rows: range, cols: slice) -> tuple[float, float]:
    """The centre (within ``rows``) of the line most covered by the floor's grey (0.4), which
    antialiasing spreads over two rows, and its coverage."""
    grey = (img.max(-1) - img.min(-1) <= 6) & (img[..., 0] >= 60) & (img[..., 0] <= 160)
    cover = grey[rows.start : rows.stop, cols].mean(1)
    line = np.flatnonzero(cover > cover.max() / 2)
    return rows.start + float(line.mean()), float(cover.max())


def light_grey_cover(img: np.ndarray, row: int, cols: slice) -> float:
    """Share of ``row`` in the shaded floor interval's grey (0.85 at alpha 0.6 on white)."""
    line = img[row, cols]
    return float(((line.max(-1) - line.min(-1) <= 6) & (abs(line[:, 0] - 232) <= 8)).mean())


def test_figures_are_deterministic_pngs_without_version_metadata() -> None:
    png = fid_vs_nfe_png(ROWS, 2.0, 400)
    assert png == fid_vs_nfe_png(ROWS, 2.0, 400)
    assert guidance_tradeoff_png(FAMILY, 2.0) == guidance_tradeoff_png(FAMILY, 2.0)
    image = Image.open(io.BytesIO(png))
    # stable bytes across matplotlib versions: no "Software: matplotlib x.y" text chunk
    assert "Software" not in image.info
    assert image.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_points_bars_and_floor_lie_where_the_data_says() -> None:
    img = rgb(fid_vs_nfe_png(BARS, (2.3, 1.7, 2.9), 400))
    found = markers(img)
    assert len(found) == len(BARS), found
    rows, cols = [r for r, _ in found], [c for _, c in found]
    # x: log NFE (10, 100, 1000 equally spaced); y: linear in FID, upwards
    c0, c1, x_residual = affine([np.log10(p["nfe"]) for p in BARS], cols)
    r0, r1, y_residual = affine([p["fid"] for p in BARS], rows)
    assert c1 > 50 and x_residual < PX, cols
    assert r1 < -10 and y_residual < PX, rows

    def row(fid: float) -> float:
        return r0 + r1 * fid

    # the y axis runs from 0 to 1.25 x the highest bar end: its spines lie there
    spine = (img.sum(-1) < 150)[:, int(cols[0]) : int(cols[-1])].mean(1) > 0.9
    spine_rows = np.flatnonzero(spine)
    assert abs(spine_rows.max() - row(0.0)) < PX, (spine_rows, row(0.0))
    assert abs(spine_rows.min() - row(1.25 * 10.0)) < PX, (spine_rows, row(12.5))
    # each error bar spans its interval, [fid_ci_low, fid_ci_high]
    labels, _ = ndimage.label(blue(img))
    for p, (r, c) in zip(BARS, found, strict=True):
        bar = np.flatnonzero((labels == labels[round(r), round(c)]).any(1))
        assert abs(bar.min() - row(p["fid_ci_high"])) < PX, (p, bar.min())
        assert abs(bar.max() - row(p["fid_ci_low"])) < PX, (p, bar.max())
    # the floor: a dashed grey line at 2.3, the band from 1.7 to 2.9 shaded, nothing around it
    inside = range(round(row(12.5)) + 4, round(row(0.0)) - 4)
    across = slice(round(cols[0]) + 10, round(cols[-1]) - 10)
    floor_row, cover = dashed_grey_row(img, inside, across)
    assert abs(floor_row - row(2.3)) < PX and 0.3 < cover < 0.9, (floor_row, row(2.3), cover)
    between = slice(round(cols[0]) + 10, round(cols[1]) - 10)  # no points, bars or labels
    for fid in (1.85, 2.75):
        assert light_grey_cover(img, round(row(fid)), between) > 0.8, fid
    for fid in (1.4, 3.3):
        assert light_grey_cover(img, round(row(fid)), between) < 0.2, fid
    # without a floor: no dashed line and no band
    bare = rgb(fid_vs_nfe_png(BARS, None))
    assert dashed_grey_row(bare, inside, across)[1] < 0.1
    assert light_grey_cover(bare, round(row(2.3)), between) < 0.2


def test_one_row_one_point_and_no_bars_without_an_interval() -> None:
    img = rgb(fid_vs_nfe_png(ROWS[:1], 2.0))
    assert len(markers(img)) == 1
    both = rgb(fid_vs_nfe_png(ROWS, 2.0))
    found = markers(both)
    assert len(found) == 2
    labels, _ = ndimage.label(blue(both))
    for r, c in found:  # only the marker itself: about 9 px tall
        height = np.flatnonzero((labels == labels[round(r), round(c)]).any(1)).size
        assert height < 14, height


def test_guidance_points_lie_at_their_accuracy_and_fid_joined_in_order_of_w() -> None:
    # given out of order; the label is empty, so the legend holds only the floor
    family = {"": [{"guidance": 2.0, "fid": 12.0, "class_accuracy": 0.9},
                   {"guidance": 0.0, "fid": 8.0, "class_accuracy": 0.5},
                   {"guidance": 1.0, "fid": 6.0, "class_accuracy": 0.8}]}
    img = rgb(guidance_tradeoff_png(family, 3.0))
    found = markers(img)
    assert len(found) == 3, found
    by_accuracy = sorted(family[""], key=lambda p: p["class_accuracy"])  # left to right
    rows, cols = [r for r, _ in found], [c for _, c in found]
    c0, c1, x_residual = affine([p["class_accuracy"] for p in by_accuracy], cols)
    r0, r1, y_residual = affine([p["fid"] for p in by_accuracy], rows)
    assert c1 > 0 and x_residual < PX, cols
    assert r1 < 0 and y_residual < PX, rows

    def at(accuracy: float, fid: float) -> tuple[int, int]:
        return round(r0 + r1 * fid), round(c0 + c1 * accuracy)

    mask = ndimage.binary_dilation(blue(img), np.ones((3, 3)))  # a 1-2 px line, +-1 px
    w = {p["guidance"]: p for p in family[""]}

    def middle(a: float, b: float) -> tuple[int, int]:
        return at((w[a]["class_accuracy"] + w[b]["class_accuracy"]) / 2,
                  (w[a]["fid"] + w[b]["fid"]) / 2)

    joined = [bool(mask[middle(a, b)]) for a, b in ((0.0, 1.0), (1.0, 2.0), (0.0, 2.0))]
    assert joined == [True, True, False], f"segments w0-w1, w1-w2, w0-w2 drawn: {joined}"
    inside = range(at(0, 12.0)[0] + 4, at(0, 0.0)[0] - 4)
    across = slice(round(cols[0]) + 10, round(cols[-1]) - 10)
    floor_row, cover = dashed_grey_row(img, inside, across)
    assert abs(floor_row - at(0, 3.0)[0]) < PX and cover > 0.3, (floor_row, cover)
    assert dashed_grey_row(rgb(guidance_tradeoff_png(family, None)), inside, across)[1] < 0.1


@pytest.mark.parametrize("draw", [lambda: guidance_tradeoff_png({}, None),
                                  lambda: guidance_tradeoff_png({"x": []}, 1.0),
                                  lambda: fid_vs_nfe_png([{"method": "skipped", "nfe": None,
                                                           "fid": None}], None)])
def test_nothing_to_plot_still_gives_a_figure(draw) -> None:
    empty = draw()
    assert pixels(empty).shape == pixels(guidance_tradeoff_png(FAMILY, 2.0)).shape
    assert pixels(empty).min() < 128  # the title and the note are drawn
    assert not blue(rgb(empty)).any()  # and no points


def test_sample_grids_put_image_k_in_row_k_div_10_column_k_mod_10_upscaled_on_white() -> None:
    import torch

    from pipeline.image_grid import grid_png

    values = torch.arange(12, dtype=torch.uint8) * 20  # image k is the constant 20 k
    images = values.view(12, 1, 1, 1).expand(12, 1, 8, 8).contiguous()
    grid = np.asarray(Image.open(io.BytesIO(grid_png(images))))
    cell, pad = 32, 2  # 8 px upscaled to at least 32, 2 px of padding
    assert grid.shape == (2 * (cell + pad) + pad, 10 * (cell + pad) + pad)
    for k, v in enumerate(values.tolist()):
        r, c = divmod(k, 10)
        top, left = pad + r * (cell + pad), pad + c * (cell + pad)
        assert (grid[top:top + cell, left:left + cell] == v).all(), k
    assert (grid[pad + cell + pad:, pad + 2 * (cell + pad):] == 255).all()  # empty cells
    assert (grid[:pad] == 255).all() and (grid[:, :pad] == 255).all()  # the padding
    assert grid_png(images, limit=3) != grid_png(images)
