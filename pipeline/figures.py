"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* :func:`fid_vs_nfe_png`: FID against the number of denoiser evaluations per image (log x),
  one labelled point per method with its interval as an error bar, the FID floor dashed and its
  interval shaded: the cost/quality trade-off of the samplers (DDPM, Ho et al. 2020; DDIM,
  Song et al. 2021; Score-SDE, Song et al. 2021).
* :func:`guidance_tradeoff_png`: FID against class accuracy as the classifier-free guidance
  weight ``w`` grows (Ho & Salimans 2022, eq. 6: ``eps~ = (1 + w) eps(x, c) - w eps(x)``), one
  line per sampler setting, points labelled by ``w``, the FID floor dashed.

Both return PNG bytes (the caller writes them atomically) and draw a titled, empty figure with
a note when there is nothing to plot, so the report's outputs always exist.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

FIGSIZE = (6.4, 4.4)
DPI = 110


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version: stable bytes
    return buf.getvalue()


def _empty(ax: Any, note: str) -> None:
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


Floor = float | tuple[float, float, float] | None  # value, or (value, low, high)


def _floor(ax: Any, floor: Floor, n_images: int | None) -> None:
    if floor is None:
        return
    value, band = (floor, None) if isinstance(floor, int | float) else (floor[0], floor[1:])
    what = f"FID floor ({n_images} real images)" if n_images else "FID floor"
    ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=what)
    if band is not None:
        ax.axhspan(band[0], band[1], color="0.85", alpha=0.6, zorder=0)


def _floor_top(floor: Floor) -> float:
    if floor is None:
        return 0.0
    return float(floor) if isinstance(floor, int | float) else float(floor[2])


def _errors(rows: Sequence[dict[str, Any]]) -> list[list[float]] | None:
    """Asymmetric error bars ``[below, above]`` from ``fid_ci_low``/``fid_ci_high`` if present."""
    if not all(r.get("fid_ci_low") is not None for r in rows):
        return None
    return [
        [r["fid"] - r["fid_ci_low"] for r in rows],
        [r["fid_ci_high"] - r["fid"] for r in rows],
    ]


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)


def fid_vs_nfe_png(
    rows: Sequence[dict[str, Any]], floor: Floor, n_images: int | None = None
) -> bytes:
    """FID (y) against NFE per image (x, log scale), one point per row labelled by its method.

    ``rows`` hold ``method``, ``nfe``, ``fid``, optionally ``fid_ci_low``/``fid_ci_high`` (error
    bars) and ``sampler`` (one colour each); ``floor`` (a value, or ``(value, low, high)``) is a
    dashed line with its interval shaded.
    """
    fig, ax = _figure()
    ax.set_title("FID against denoiser evaluations per image")
    points = [r for r in rows if r.get("nfe") and r.get("fid") is not None]
    if not points:
        _empty(ax, "no evaluated sampling methods")
        return _png(fig)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    samplers = list(dict.fromkeys(r.get("sampler", "") for r in points))
    for sampler in samplers:  # one colour per sampler
        mine = [r for r in points if r.get("sampler", "") == sampler]
        ax.errorbar(
            [r["nfe"] for r in mine],
            [r["fid"] for r in mine],
            yerr=_errors(mine),
            fmt="o",
            capsize=3,
            label=sampler,
            zorder=3,
        )
    for r in points:
        ax.annotate(
            r["method"], (r["nfe"], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    _floor(ax, floor, n_images)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 10, 100, 1000 rather than 10^k
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE per image (log scale)")
    ax.set_ylabel("FID")
    top = max([float(r.get("fid_ci_high") or r["fid"]) for r in points] + [_floor_top(floor)])
    ax.set_ylim(0, 1.25 * top if top > 0 else 1.0)  # head room above the floor and the points
    ax.margins(x=0.1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def guidance_tradeoff_png(
    families: dict[str, Sequence[dict[str, Any]]],
    floor: Floor,
    n_images: int | None = None,
) -> bytes:
    """FID (y) against class accuracy (x), one line per family ordered by ``guidance``.

    ``families`` maps a legend label to rows holding ``guidance``, ``fid`` and
    ``class_accuracy``; each point is labelled ``w=<guidance>``.
    """
    fig, ax = _figure()
    ax.set_title("Classifier-free guidance: FID against class accuracy")
    if not any(families.values()):
        _empty(ax, "no classifier-free guidance methods (guidance > 0) with class accuracy")
        return _png(fig)
    for label, rows in families.items():
        ordered = sorted(rows, key=lambda r: r["guidance"])
        xs = [r["class_accuracy"] for r in ordered]
        ys = [r["fid"] for r in ordered]
        ax.errorbar(xs, ys, yerr=_errors(ordered), marker="o", capsize=3, label=label, zorder=3)
        for r, x, y in zip(ordered, xs, ys, strict=True):
            ax.annotate(
                f"w={r['guidance']:g}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    _floor(ax, floor, n_images)
    ax.set_xlabel("class accuracy of the evaluation classifier")
    ax.set_ylabel("FID")
    ax.set_ylim(bottom=0)
    ax.margins(x=0.1, y=0.1)
    _legend(ax)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)
