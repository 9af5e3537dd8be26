"""The evaluation statistics on Gaussian data where the truth is known: FID intervals and their
coverage, the floor at matched n, KID on standardised features, P/R, D/C, memorisation."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_core.evaluation import (
    FLOOR_ABOVE,
    FLOOR_BELOW,
    FLOOR_INSIDE,
    ReferenceStatistics,
    compare,
    fid_difference,
    fid_interval,
    floor_fid,
    floor_position,
    joint_fid_draws,
    joint_plan,
    kid,
    kid_subset_size,
    near_copy_fraction,
    nearest_distances,
    paired_difference,
    prdc,
    proportion_interval,
    reference_split,
    standardise,
)

D = 4


def normal(
    rng: np.random.Generator, n: int, scale: float = 1.0, shift: float = 0.0, dim: int = D
) -> np.ndarray:
    return rng.normal(size=(n, dim)) * scale + shift


def expected_fid(ref: ReferenceStatistics, n: int, scale: float, shift: float) -> float:
    """``E[FID_n]`` against the fixed reference, by Monte Carlo over 2000 fresh draws."""
    rng = np.random.default_rng(12345)
    pool = normal(rng, 2000 * n, scale, shift, ref.dim)
    return float(ref.fid_of_draws(pool, np.arange(2000 * n).reshape(2000, n)).mean())


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """clean-fid's own Frechet distance of two feature sets: the reference implementation."""
    import warnings

    from cleanfid.fid import frechet_distance

    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    with warnings.catch_warnings():  # clean-fid passes sqrtm(disp=False), deprecated in SciPy
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(frechet_distance(*stats[0], *stats[1]))


def fid_closed_form(f1: np.ndarray, f2: np.ndarray) -> float:
    """``||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` with NumPy alone (unbiased
    covariances, symmetric square roots by eigendecomposition)."""
    m1, m2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False, ddof=1), np.cov(f2, rowvar=False, ddof=1)

    def psd_sqrt(a: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    r1 = psd_sqrt(s1)
    return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))


def test_fid_of_a_set_with_itself_is_zero() -> None:
    f = normal(np.random.default_rng(0), 500, dim=6)
    assert abs(ReferenceStatistics(f).fid(f)) < 1e-6


def test_fid_between_unit_gaussians_is_the_squared_mean_distance() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([1.0, -1.0, 0.0, 0.5])
    f1, f2 = rng.normal(size=(40_000, 4)) + mu1, rng.normal(size=(40_000, 4)) + mu2
    assert ReferenceStatistics(f2).fid(f1) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=0.05)


def test_fid_between_isotropic_gaussians_of_different_scale() -> None:
    """``Tr(s1^2 I + s2^2 I - 2 s1 s2 I) = d (s1 - s2)^2``."""
    rng = np.random.default_rng(3)
    d, s1, s2 = 5, 1.0, 2.0
    f1, f2 = normal(rng, 40_000, s1, dim=d), normal(rng, 40_000, s2, dim=d)
    assert ReferenceStatistics(f2).fid(f1) == pytest.approx(d * (s1 - s2) ** 2, abs=0.1)


def test_fid_is_symmetric_and_the_numpy_closed_form() -> None:
    rng = np.random.default_rng(5)
    f1 = normal(rng, 300, dim=3)
    f2 = normal(rng, 200, 0.5, 1.0, dim=3) @ np.array([[1, 0.3, 0], [0, 1, 0], [0, 0.2, 1]])
    fid = ReferenceStatistics(f2).fid(f1)
    assert fid == pytest.approx(ReferenceStatistics(f1).fid(f2), rel=1e-6)
    assert fid == pytest.approx(fid_closed_form(f1, f2), rel=1e-9)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        ReferenceStatistics(f2).fid(np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        ReferenceStatistics(np.zeros((1, 3)))


def test_fast_fid_equals_clean_fid() -> None:
    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.4, 0, 0], [0, 1, 0.2, 0], [0, 0, 1, 0], [0.3, 0, 0, 1]])
    a, b = normal(rng, 300) @ mix, normal(rng, 200, 0.7, 0.5)
    ref = ReferenceStatistics(a)
    assert ref.fid(b) == pytest.approx(fid_from_features(b, a), rel=1e-8)
    index = rng.integers(0, 200, size=(3, 150))
    batch = ref.fid_of_draws(b, index)
    assert batch == pytest.approx([fid_from_features(b[i], a) for i in index], rel=1e-8)
    counts = np.stack([np.bincount(i, minlength=200) for i in index]).astype(float)
    assert ref.fid_of_weights(b, counts) == pytest.approx(batch, rel=1e-8)


def test_closed_form_fid_between_gaussians_at_large_n() -> None:
    """``|mu1 - mu2|^2 + D (s1 - s2)^2`` for isotropic Gaussians."""
    rng = np.random.default_rng(1)
    ref = ReferenceStatistics(normal(rng, 50_000))
    fid = fid_interval(normal(rng, 50_000, 2.0, 0.5), ref, draws=20).value
    assert fid == pytest.approx(D * 0.5**2 + D * (2.0 - 1.0) ** 2, abs=0.05)


def test_fid_interval_covers_the_expected_fid_at_n() -> None:
    """100 generated sets of n = 400 in 16-D: the 95 % interval holds E[FID_n] >= 87 times."""
    rng = np.random.default_rng(2)
    ref = ReferenceStatistics(normal(rng, 300, dim=16))
    n, scale, shift = 400, 1.05, 0.05
    truth = expected_fid(ref, n, scale, shift)
    hits, percentile_hits = 0, 0
    for rep in range(100):
        g = normal(rng, n, scale, shift, dim=16)
        est = fid_interval(g, ref, draws=200, seed=rep)
        assert est.low <= est.value <= est.high
        hits += est.low <= truth <= est.high
        boot = ref.fid_of_draws(g, np.random.default_rng(rep).integers(0, n, size=(200, n)))
        lo, hi = np.quantile(boot, [0.025, 0.975])
        percentile_hits += lo <= truth <= hi
    assert 87 <= hits <= 100
    # the plain percentile interval sits too high (duplicates inflate FID): it misses the truth
    assert percentile_hits < 20


def test_floor_extrapolates_to_n_beyond_the_real_set() -> None:
    """|F| = 200 real images predict where the FID of n = 600 fresh real images lands."""
    rng = np.random.default_rng(3)
    ref = ReferenceStatistics(normal(rng, 300))
    n = 600
    pool = normal(rng, 40 * n)
    fresh = ref.fid_of_draws(pool, np.arange(40 * n).reshape(40, n))
    at_f = ref.fid_of_draws(pool, np.arange(40 * 200).reshape(40, 200))
    truth = expected_fid(ref, n, 1.0, 0.0)
    values, inside = [], 0
    for rep in range(40):
        est = floor_fid(normal(rng, 200), ref, n, seed=rep)
        assert 0 <= est.low <= est.value <= est.high and est.slope > 0
        values.append(est.value)
        inside += est.low <= fresh[rep] <= est.high
    assert inside >= 34
    assert abs(np.mean(values) - truth) < 0.25 * np.std(values) + 0.005
    # the raw |F|-image FID would overstate the floor at n: the bias line matters
    assert at_f.mean() > truth + 2 * np.std(values) / np.sqrt(40)


def test_kid_is_unbiased_scale_free_and_uses_proper_subsets() -> None:
    rng = np.random.default_rng(4)
    ref = normal(rng, 400)
    same = [
        kid(standardise(normal(rng, 400), ref), standardise(ref, ref), seed=i) for i in range(8)
    ]
    means = np.array([m for m, _ in same])
    assert abs(means.mean()) < 3 * means.std(ddof=1) / np.sqrt(8) + 1e-4
    assert all(s > 0 for _, s in same)
    far = normal(rng, 400, 1.0, 0.5)
    shifted, std = kid(standardise(far, ref), standardise(ref, ref))
    assert shifted > 5 * std > 0
    scaled = kid(standardise(far * 1000, ref * 1000), standardise(ref * 1000, ref * 1000))
    assert scaled[0] == pytest.approx(shifted, rel=1e-6)
    assert kid_subset_size(400, 225) == 112 and kid_subset_size(10_000, 10_000) == 1000
    with pytest.raises(ValueError, match="subset_size"):
        kid(ref, ref, subset_size=401)


def test_prdc_on_a_hand_computed_example() -> None:
    """1-D points: real 0, 1, 2, 3 (k = 1 radius 1 each); fakes 0.5 (inside) and 10 (outside)."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [11.0]])
    out = prdc(real, fake, k_pr=1, k_dc=1)
    assert out["precision"] == pytest.approx(1 / 3)
    # fake radii (k = 1): 0.5 -> 9.5, 10 -> 1, 11 -> 1; reals within 9.5 of 0.5: all four
    assert out["recall"] == 1.0
    assert out["density"] == pytest.approx(2 / 3)  # 0.5 is in the balls of 0 and 1
    assert out["coverage"] == pytest.approx(2 / 4)


def test_prdc_separates_fidelity_from_diversity() -> None:
    rng = np.random.default_rng(5)
    real = normal(rng, 500)
    same = prdc(real, normal(rng, 500))
    collapsed = prdc(real, normal(rng, 500, 0.3))  # guidance-like: typical but not diverse
    spread = prdc(real, normal(rng, 500, 2.5))  # diverse but often off the data
    assert same["precision"] > 0.7 and same["recall"] > 0.7 and same["coverage"] > 0.9
    assert 0.8 < same["density"] < 1.2
    assert collapsed["precision"] > same["precision"] and collapsed["recall"] < 0.5
    assert collapsed["coverage"] < same["coverage"]
    assert spread["precision"] < 0.5 and spread["density"] < 0.5


def test_memorised_samples_are_near_copies() -> None:
    rng = np.random.default_rng(6)
    train = rng.normal(size=(300, 16))
    held_ref, held_floor = rng.normal(size=(100, 16)), rng.normal(size=(100, 16))
    ref_d = nearest_distances(held_ref, train)
    np.testing.assert_allclose(
        nearest_distances(train[:5] + 1e-3, train), 1e-3 * np.sqrt(16), rtol=1e-6
    )
    fresh, threshold = near_copy_fraction(nearest_distances(held_floor, train), ref_d)
    copies = train[:50] + 0.01 * rng.normal(size=(50, 16))
    copied, _ = near_copy_fraction(nearest_distances(copies, train), ref_d)
    assert fresh < 0.2 and copied == 1.0 and threshold > 0


def test_reference_split_is_stratified_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(10), [45, 46, 44, 46, 45, 46, 45, 45, 43, 45])
    ref, floor = reference_split(labels, seed=0)
    assert np.intersect1d(ref, floor).size == 0 and ref.size + floor.size == labels.size
    counts_r, counts_f = np.bincount(labels[ref]), np.bincount(labels[floor])
    assert np.all(np.abs(counts_r - counts_f) <= 1)
    again = reference_split(labels, seed=0)
    assert np.array_equal(again[0], ref) and not np.array_equal(reference_split(labels, 1)[0], ref)


def test_position_against_the_floor() -> None:
    assert floor_position(5.0, 4.0, 6.0) == FLOOR_INSIDE
    assert floor_position(7.0, 4.0, 6.0) == FLOOR_ABOVE
    assert floor_position(3.0, 4.0, 6.0) == FLOOR_BELOW
    assert floor_position(6.0, 4.0, 6.0) == floor_position(4.0, 4.0, 6.0) == FLOOR_INSIDE


def test_score_features_compares_with_real_data_at_the_floors_size() -> None:
    """n = 600 samples, |F| = 200: the verdict's FID and the floor are both at m = 200."""
    from diffusion_core.evaluation import score_features

    rng = np.random.default_rng(7)
    ref, floor = normal(rng, 300, dim=8), normal(rng, 200, dim=8)
    real_like = score_features(normal(rng, 600, dim=8), ref, floor, draws=50, kid_subsets=10)
    shifted = score_features(
        normal(rng, 600, 1.0, 0.5, dim=8), ref, floor, draws=50, kid_subsets=10
    )
    for out in (real_like, shifted):
        assert out["fid_matched_n"] == 200 and out["prdc_n"] == 200
        assert out["kid_subset_size"] == 100
        assert out["fid_ci_low"] <= out["fid"] <= out["fid_ci_high"]
    assert (
        real_like["fid_floor_ci_low"] <= real_like["fid_matched"] <= real_like["fid_floor_ci_high"]
    )
    assert shifted["fid_matched"] > shifted["fid_floor_ci_high"]
    assert shifted["kid_x1000"] > shifted["kid_floor_x1000"] + 3 * shifted["kid_x1000_std"]


def test_score_features_reports_each_score_in_order() -> None:
    from diffusion_core.evaluation import SCORES, score_features

    rng = np.random.default_rng(8)
    seen: list[str] = []
    quiet = score_features(normal(rng, 40), normal(rng, 30), normal(rng, 20), draws=10,
                           kid_subsets=4)
    rng = np.random.default_rng(8)
    heard = score_features(normal(rng, 40), normal(rng, 30), normal(rng, 20), draws=10,
                           kid_subsets=4, callback=seen.append)
    assert seen == list(SCORES)
    assert heard == quiet  # the callback only watches


def test_wilson_interval_matches_its_closed_form_and_stays_in_0_1():
    """Wilson (1927): 5 of 10 at 95 % is 0.5 +- 0.2634; 0 of 10 gives [0, 0.2775]."""
    lo, hi = proportion_interval(5, 10, 0.95)
    assert (lo, hi) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert proportion_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert proportion_interval(0, 10)[0] == 0.0 and proportion_interval(10, 10)[1] == 1.0
    narrow, wide = proportion_interval(30, 500, 0.8), proportion_interval(30, 500, 0.99)
    assert wide[0] < narrow[0] < 0.06 < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="0 <= k <= n"):
        proportion_interval(11, 10)


def test_joint_draws_resample_both_sets_and_match_clean_fid() -> None:
    """Draw ``b`` is the FID of the resampled generated set against the resampled reference."""
    rng = np.random.default_rng(3)
    gen, ref = normal(rng, 60, 0.8, 0.3), normal(rng, 40)
    plan = joint_plan(60, 40, draws=5, seed=1)
    draws = joint_fid_draws(gen, ref, plan)
    for b in range(5):
        g = np.repeat(gen, plan.samples[b], axis=0)
        r = np.repeat(ref, plan.reference[b], axis=0)
        assert draws[b] == pytest.approx(fid_from_features(g, r), rel=1e-7)
    ones = plan._replace(samples=np.ones((1, 60), int), reference=np.ones((1, 40), int))
    assert joint_fid_draws(gen, ref, ones)[0] == pytest.approx(ReferenceStatistics(ref).fid(gen))
    with pytest.raises(ValueError, match="same seeds"):
        joint_fid_draws(gen[:50], ref, plan)


def test_paired_difference_of_a_shift_is_the_closed_form() -> None:
    """``a = b + delta`` changes only the mean term: ``FID_a - FID_b = |delta|^2 + 2 delta.(mu_b -
    mu_R)``, on the data and on every draw; the covariance noise cancels, and the spread left
    is that of ``2 delta.(mu*_b - mu*_R)``, standard deviation ``2 |delta| sqrt(1/n + 1/|R|)``
    for unit-variance features."""
    rng = np.random.default_rng(4)
    b, ref = normal(rng, 200), normal(rng, 150, shift=0.1)
    delta = np.array([0.6, -0.4, 0.2, 0.0])
    d = fid_difference(b + delta, b, ref, draws=400, seed=0)
    exact = float(delta @ delta + 2 * delta @ (b.mean(0) - ref.mean(0)))
    assert d.value == pytest.approx(exact, rel=1e-6)
    width = 2 * 1.96 * 2 * np.linalg.norm(delta) * np.sqrt(1 / 200 + 1 / 150)
    assert 0.75 * width < d.high - d.low < 1.25 * width
    assert compare(d) == "worse"
    assert compare(fid_difference(b, b + delta, ref, draws=100, seed=0)) == "better"


def test_paired_interval_from_draw_differences() -> None:
    """A constant offset between the draws leaves an interval of width 0 at the value."""
    draws = np.random.default_rng(5).normal(10.0, 3.0, size=200)
    d = paired_difference(12.0, 10.0, draws + 2.0, draws)
    assert (d.value, d.low, d.high) == pytest.approx((2.0, 2.0, 2.0))
    assert d.shared == pytest.approx(1.0)
    independent = paired_difference(12.0, 10.0, draws, np.random.default_rng(6).normal(10, 3, 200))
    assert independent.low < 2.0 < independent.high and abs(independent.shared) < 0.2
    with pytest.raises(ValueError):
        paired_difference(1.0, 1.0, draws, draws[:10])


def test_paired_false_positive_rate_on_gaussians_is_at_most_nominal() -> None:
    """Two independent sets from the same Gaussian, 40 repetitions: resolved at most twice
    (nominal 5 %: 2 of 40)."""
    rng = np.random.default_rng(7)
    ref = normal(rng, 150, dim=8)
    resolved = sum(
        compare(fid_difference(normal(rng, 200, dim=8), normal(rng, 200, dim=8), ref,
                               draws=200, seed=rep)) != "not resolved"
        for rep in range(40)
    )
    assert resolved <= 2
    shifted = [compare(fid_difference(normal(rng, 200, shift=0.5, dim=8),
                                      normal(rng, 200, dim=8), ref, seed=rep))
               for rep in range(5)]
    assert shifted == ["worse"] * 5  # and a real difference is seen
