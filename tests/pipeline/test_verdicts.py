"""The evaluation record's verdict: one sentence for each position against the floor."""

from __future__ import annotations

import pytest

from diffusion_core.evaluation import FLOOR_ABOVE, FLOOR_BELOW, FLOOR_INSIDE
from pipeline.report import _VERDICT_WORDS
from pipeline.verdicts import VERDICT_BELOW, VERDICT_REAL, VERDICT_WORSE, VERDICTS, verdict


@pytest.mark.parametrize(("fid", "expected"), [(5.0, VERDICT_REAL), (7.0, VERDICT_WORSE),
                                               (3.0, VERDICT_BELOW)])
def test_verdict_names_the_position_against_the_floor(fid: float, expected: str) -> None:
    assert verdict(fid, 4.0, 6.0) == expected


def test_every_position_has_a_sentence_the_report_can_shorten() -> None:
    assert set(VERDICTS) == {FLOOR_ABOVE, FLOOR_BELOW, FLOOR_INSIDE}
    assert len(set(VERDICTS.values())) == 3
    assert set(VERDICTS.values()) == set(_VERDICT_WORDS)  # the README table's short words
