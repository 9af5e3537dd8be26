"""The words of the evaluation record and the report for where a method's FID lies against the
real-data floor (:func:`diffusion_core.evaluation.floor_position`; the protocol is in
docs/evaluation.md)."""

from __future__ import annotations

from diffusion_core.evaluation import FLOOR_ABOVE, FLOOR_BELOW, FLOOR_INSIDE, floor_position

__all__ = ["VERDICT_BELOW", "VERDICT_REAL", "VERDICT_WORSE", "VERDICTS", "verdict"]

VERDICT_REAL = "indistinguishable from real data at this n"
VERDICT_WORSE = "worse than floor"
VERDICT_BELOW = "below floor (check near copies)"
#: the verdict for each position against the floor
VERDICTS = {FLOOR_INSIDE: VERDICT_REAL, FLOOR_ABOVE: VERDICT_WORSE, FLOOR_BELOW: VERDICT_BELOW}


def verdict(fid: float, floor_low: float, floor_high: float) -> str:
    """The sentence for ``fid`` against the floor's prediction interval
    ``[floor_low, floor_high]``, as the evaluation record stores it."""
    return VERDICTS[floor_position(fid, floor_low, floor_high)]
