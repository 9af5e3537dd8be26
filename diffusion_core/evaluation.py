"""Sample-quality statistics with uncertainty: FID intervals, the real-data floor, KID, P/R, D/C.

Pure numpy functions of feature arrays ``(N, D)`` (and, for memorisation, of flattened images);
the pipeline wires them to files. The protocol they implement:

* **Reference and floor.** Held-out real images (never seen by the generator nor by the feature
  extractor) are split, stratified by class and seeded, into a reference half ``R`` and a floor
  half ``F`` (:func:`reference_split`). Every generated set is scored against ``R``. The floor is
  what ``n`` *real* images score against the same ``R``: ``F`` against ``R`` at matched ``n``.
* **FID at n, and the floor at matched n** (Heusel et al. 2017). FID is biased upwards, by an
  amount that shrinks with the number of images, so values are only comparable at equal ``n``.
  Methods are compared with each other at the full ``n`` (``fid``). The comparison with real
  data is made at ``m = min(n, |F|)``, the most images the held-out data allow on both sides:
  the generated set's first ``m`` images (``fid_matched``) against the floor at ``m``
  (:func:`floor_fid`, which fits ``FID(m') = a + b/m'`` to subsets of ``F`` at several sizes
  ``m' <= |F|``, Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to
  find them", and reads it at ``m``). We do not extrapolate the floor beyond ``|F|``: on 64-D
  Gaussians the fit extrapolates well, but on the digit classifier's features ``m' FID(m')``
  drifts from 13,900 at ``m' = 40`` to 10,100 at ``m' = 223`` (the bias is not linear in ``1/m'``
  while ``m'`` is a few times the feature dimension), the fit's intercept is negative and the
  extrapolated floor at ``n = 2000`` would be 0.
* **Intervals** (level ``confidence``, default 0.95), conditional on the fixed ``R`` (the same
  ``R`` for every method and the floor, so its own noise is a common offset):

  - a generated set's FID (:func:`fid_interval`): a *pivotal bootstrap centred on the bootstrap
    mean*. Resampling with replacement inflates FID (duplicates shrink the effective sample), so
    the percentile interval would sit above the estimate. We use only the bootstrap
    *deviations* ``d_b = FID(G*_b, R) - mean_b FID(G*_b, R)`` and report
    ``[FID - q_{1-a/2}(d), FID - q_{a/2}(d)]``: a confidence interval for ``E[FID_n]``, the
    expected FID of ``n`` images from this generator. On 16-D Gaussians at ``n = 400`` it holds
    the true ``E[FID_n]`` in about 97 of 100 repetitions; the plain percentile interval in
    about 4 (``tests/diffusion_core/test_evaluation.py``). On the classifier features of real
    digits it is conservative: at ``n = 112..225`` the bootstrap standard deviation is about 1.5x
    the spread over disjoint real draws (FID's spread there shrinks faster than ``1/sqrt(n)``, and
    resampled sets behave like smaller ones), so it may leave a real difference unresolved but
    does not invent one.
  - the floor (:func:`floor_fid`): a *prediction interval* for the FID of ``n`` fresh real images:
    the fitted centre plus the deviations of a size-``n`` bootstrap of ``F`` (the spread of an
    ``n``-image FID) plus those of a size-``|F|`` bootstrap (the uncertainty of the centre).
* **Against the floor** (:func:`floor_position`): a method's ``fid_matched`` inside the floor's
  prediction interval (both at ``m``) cannot be told from real data at this ``n`` (the floor
  interval already holds the spread of an ``n``-image FID, so this is a test at about the stated
  level); above it, it is worse than real data; below it, better than real data (look at the
  near-copy fraction). The report's words for the three are ``pipeline.verdicts``.
* **Paired differences** between two methods (:func:`paired_difference`): every method draws
  image ``i`` from seed ``i`` and is scored against the same ``R``, so a *joint bootstrap*
  (:func:`joint_plan`) resamples the seeds and the reference once for both, and the interval
  of ``FID_a - FID_b`` comes from the draw-by-draw differences (:func:`joint_fid_draws`): the
  shared noise cancels. :func:`compare` reads it as better, worse or not resolved.
* **KID** (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with the cubic kernel
  ``k(x, y) = (x.y / D + 1)^3`` on features *standardised* by the reference's per-dimension mean
  and standard deviation (:func:`standardise`), so the kernel's scale does not depend on the
  extractor's; mean and standard deviation over random subsets of ``m`` images drawn without
  replacement from each set, ``m`` at most half of the smaller set (:func:`kid`). Unbiased, so
  its floor needs no matching in ``n``; report ``x1000``.
* **Precision / recall** (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", k = 3) and **density / coverage** (Naeem et al. 2020, "Reliable
  Fidelity and Diversity Metrics for Generative Models", k = 5) in the same standardised feature
  space (:func:`prdc`): precision and density measure fidelity, recall and coverage diversity.
* **Memorisation** (:func:`nearest_distances`, :func:`near_copy_fraction`): the distance of each
  image to its nearest training image; a near-copy is closer than the ``q``-quantile of the
  held-out reference images' own nearest-training distances. Held-out real images give
  about ``q``; a generator that copies gives more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from threadpoolctl import ThreadpoolController

__all__ = [
    "SCORES",
    "COMPARE_BETTER",
    "COMPARE_UNRESOLVED",
    "COMPARE_WORSE",
    "Difference",
    "Estimate",
    "FloorEstimate",
    "ReferenceStatistics",
    "compare",
    "fid_difference",
    "fid_interval",
    "floor_fid",
    "kid",
    "kid_subset_size",
    "memorisation",
    "near_copy_fraction",
    "nearest_distances",
    "prdc",
    "reference_split",
    "score_features",
    "standardise",
    "floor_position",
    "FLOOR_ABOVE",
    "FLOOR_BELOW",
    "FLOOR_INSIDE",
    "joint_fid_draws",
    "joint_plan",
    "JointPlan",
    "paired_difference",
    "weighted_moments",
]

#: where a FID lies against the floor's prediction interval (:func:`floor_position`)
FLOOR_ABOVE = "above"
FLOOR_BELOW = "below"
FLOOR_INSIDE = "inside"
_CHUNK_ELEMENTS = 4_000_000  # floats per temporary array in the chunked computations
#: what :func:`score_features` computes, in order; its ``callback`` sees each name when done
SCORES = ("fid", "fid_floor", "kid", "kid_floor", "prdc", "prdc_floor")


_THREADPOOLS: list[ThreadpoolController] = []


def _one_blas_thread():  # noqa: ANN202 (a context manager)
    """Limit BLAS/LAPACK to one thread: these are many small matrices, where threads only cost
    (threaded OpenBLAS is ~30x slower for batches of 64x64 eigenproblems on a busy machine)."""
    if not _THREADPOOLS:
        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="blas")


class Estimate(NamedTuple):
    """A value and its interval ``[low, high]``."""

    value: float
    low: float
    high: float


class FloorEstimate(NamedTuple):
    """The floor at ``n``: value ``a + b/n``, its prediction interval and the bias slope ``b``."""

    value: float
    low: float
    high: float
    slope: float


class ReferenceStatistics:
    """Mean, covariance and covariance square root of reference features, for fast FIDs.

    ``fid(mu, cov) = |mu - mu_r|^2 + Tr cov + Tr cov_r - 2 Tr (A cov A)^(1/2)`` with
    ``A = cov_r^(1/2)``: ``A cov A`` is similar to ``cov cov_r``, so this is the Frechet distance
    of clean-fid's ``frechet_distance``, computed by one symmetric eigen-decomposition per set
    (vectorised over many sets).
    """

    def __init__(self, features: np.ndarray) -> None:
        features = _as_features(features, "reference")
        self.mu = features.mean(axis=0)
        self.cov = np.atleast_2d(np.cov(features, rowvar=False))
        self.sqrt_cov = _psd_sqrt(self.cov)
        self.trace = float(np.trace(self.cov))
        self.dim = features.shape[1]

    def fid_batch(self, mus: np.ndarray, covs: np.ndarray) -> np.ndarray:
        """FIDs ``(B,)`` of sets with means ``(B, D)`` and covariances ``(B, D, D)``."""
        return _frechet(mus, covs, self.mu, self.sqrt_cov, self.trace)

    def fid(self, features: np.ndarray) -> float:
        """FID of one feature set ``(N, D)`` against the reference."""
        features = _as_features(features, "features")
        if features.shape[1] != self.dim:
            raise ValueError(f"feature dimensions differ: {features.shape[1]} and the "
                             f"reference's {self.dim}")
        mus, covs = _moments(features, None)
        return float(self.fid_batch(mus, covs)[0])

    def fid_of_draws(self, features: np.ndarray, index: np.ndarray) -> np.ndarray:
        """FIDs of the sets ``features[index[b]]`` for each row ``b`` of ``index`` ``(B, m)``."""
        out = np.empty(index.shape[0])
        chunk = max(1, _CHUNK_ELEMENTS // (index.shape[1] * features.shape[1]))
        for lo in range(0, index.shape[0], chunk):
            mus, covs = _moments(features, index[lo : lo + chunk])
            out[lo : lo + chunk] = self.fid_batch(mus, covs)
        return out

    def fid_of_weights(self, features: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """FIDs of the multisets holding row ``i`` of ``features`` ``counts[b, i]`` times
        (moments from :func:`weighted_moments`)."""
        mus, covs = weighted_moments(features, counts)
        return self.fid_batch(mus, covs)


def weighted_moments(features: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means ``(B, D)`` and unbiased covariances ``(B, D, D)`` of the multisets holding row ``i``
    of ``features`` ``counts[b, i]`` times.

    One matrix product each: ``mu_b = c_b X / m``, ``cov_b = (c_b (x x^T) - m mu_b mu_b^T) /
    (m - 1)`` (``m = sum c_b``), on features centred first (a shift leaves the covariance
    unchanged), in chunks of rows.
    """
    features = _as_features(features, "features")
    if counts.ndim != 2 or counts.shape[1] != features.shape[0]:
        raise ValueError(f"counts must be (B, {features.shape[0]}), got {counts.shape}")
    centre = features.mean(axis=0)
    x = features - centre
    d = x.shape[1]
    m = counts.sum(axis=1)
    sums = counts @ x
    second = np.zeros((counts.shape[0], d * d))
    step = max(1, _CHUNK_ELEMENTS // (d * d))
    for lo in range(0, x.shape[0], step):
        chunk = x[lo : lo + step]
        outer = (chunk[:, :, None] * chunk[:, None, :]).reshape(chunk.shape[0], d * d)
        second += counts[:, lo : lo + step] @ outer
    mus = sums / m[:, None]
    covs = second.reshape(-1, d, d) - m[:, None, None] * mus[:, :, None] * mus[:, None, :]
    covs /= (m - 1)[:, None, None]
    return mus + centre, covs


def _psd_sqrt(covs: np.ndarray) -> np.ndarray:
    """Symmetric square roots of covariances ``(..., D, D)``, by eigendecomposition."""
    evals, evecs = np.linalg.eigh(covs)
    return (evecs * np.sqrt(np.clip(evals, 0.0, None))[..., None, :]) @ np.swapaxes(evecs, -1, -2)


def _frechet(mus: np.ndarray, covs: np.ndarray, ref_mus: np.ndarray, ref_roots: np.ndarray,
             ref_traces: np.ndarray | float) -> np.ndarray:
    """``|mu - mu_r|^2 + Tr cov + Tr cov_r - 2 Tr (A cov A)^(1/2)`` with ``A = cov_r^(1/2)``
    (``ref_roots``), for sets ``(B, D)``/``(B, D, D)`` against one reference or one each."""
    with _one_blas_thread():
        inner = ref_roots @ covs @ ref_roots
        inner = 0.5 * (inner + np.swapaxes(inner, -1, -2))
        eigenvalues = np.linalg.eigvalsh(inner)
    root_trace = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum(-1)
    mean_term = ((mus - ref_mus) ** 2).sum(-1)
    return mean_term + np.trace(covs, axis1=-2, axis2=-1) + ref_traces - 2.0 * root_trace


def _as_features(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what} must be (N >= 2, D), got {x.shape}")
    return x


def _moments(features: np.ndarray, index: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Means ``(B, D)`` and unbiased covariances ``(B, D, D)`` of ``features[index[b]]``."""
    xs = features[None] if index is None else features[index]
    mus = xs.mean(axis=1)
    centred = xs - mus[:, None, :]
    with _one_blas_thread():
        covs = np.swapaxes(centred, 1, 2) @ centred / (xs.shape[1] - 1)
    return mus, covs


def _pivot(value: float, draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """``[value - q_hi(d), value - q_lo(d)]`` with ``d`` the draws' deviations from their mean."""
    _check_confidence(confidence)
    tail = (1.0 - confidence) / 2.0
    dev = draws - draws.mean()
    q_lo, q_hi = np.quantile(dev, [tail, 1.0 - tail])
    return value - float(q_hi), value - float(q_lo)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def fid_interval(
    features: np.ndarray,
    reference: ReferenceStatistics,
    *,
    draws: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """FID of ``features`` against ``reference`` with a bootstrap interval for ``E[FID_n]``.

    Pivotal bootstrap centred on the bootstrap mean: ``draws`` resamples with replacement of the
    ``n`` feature rows; interval ``[FID - q_{1-a/2}(d), FID - q_{a/2}(d)]`` with
    ``d_b = FID*_b - mean(FID*)``, clipped below at 0. See the module docstring for why.
    """
    features = _as_features(features, "features")
    if draws < 2:
        raise ValueError(f"draws must be >= 2, got {draws}")
    value = reference.fid(features)
    n = features.shape[0]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), draws)
    low, high = _pivot(value, reference.fid_of_weights(features, counts), confidence)
    return Estimate(value, max(low, 0.0), high)


def floor_fid(
    real: np.ndarray,
    reference: ReferenceStatistics,
    n: int,
    *,
    draws: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    num_sizes: int = 4,
) -> FloorEstimate:
    """The FID that ``n`` real images reach against ``reference``, from the real set ``real``.

    Centre: least-squares fit of ``FID(m) = a + b/m`` to ``draws`` subsets of ``real`` drawn
    without replacement at ``num_sizes`` sizes ``m`` evenly spaced in ``[|F|/2, |F|]``, evaluated
    at ``n`` (Chong & Forsyth 2020). Interval: the centre minus the quantiles of the summed
    deviations (from their means) of a size-``n`` and a size-``|F|`` bootstrap of ``real``;
    value and interval clipped below at 0. A prediction interval for one ``n``-image real FID.
    """
    real = _as_features(real, "real")
    size = real.shape[0]
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if size < 8:
        raise ValueError(f"the floor needs >= 8 real images, got {size}")
    if draws < 2 or num_sizes < 2:
        raise ValueError(f"need draws >= 2 and num_sizes >= 2, got {draws}, {num_sizes}")
    rng = np.random.default_rng(seed)
    sizes = np.unique(np.linspace(size / 2, size, num_sizes).round().astype(int))
    inv_m, fids = [], []
    per_size = max(2, draws // len(sizes))
    for m in sizes:
        count = 1 if m == size else per_size  # every subset of size |F| is F itself
        index = np.stack([rng.permutation(size)[:m] for _ in range(count)])
        fids.append(reference.fid_of_draws(real, index))
        inv_m.append(np.full(count, 1.0 / m))
    x, y = np.concatenate(inv_m), np.concatenate(fids)
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    value = max(float(a + b / n), 0.0)  # FID >= 0; a line fitted to noisy draws may dip below
    at_n = reference.fid_of_weights(real, rng.multinomial(n, np.full(size, 1 / size), draws))
    at_size = reference.fid_of_weights(real, rng.multinomial(size, np.full(size, 1 / size), draws))
    spread = (at_n - at_n.mean()) + (at_size - at_size.mean())
    low, high = _pivot(value, spread, confidence)
    return FloorEstimate(value, max(low, 0.0), high, float(b))


class JointPlan(NamedTuple):
    """The draws of a joint bootstrap: ``samples (B, n)`` counts over the ``n`` shared seeds
    (image ``i`` of every method is seed ``i``) and ``reference (B, |R|)`` counts over ``R``."""

    samples: np.ndarray
    reference: np.ndarray


def joint_plan(n: int, n_reference: int, draws: int, seed: int) -> JointPlan:
    """The joint bootstrap of ``n`` paired images and ``n_reference`` reference images: the
    same ``draws`` resamples for every method scored with this seed, so draw ``b`` of two
    methods resamples the same seeds and the same reference images."""
    if n < 2 or n_reference < 2 or draws < 2:
        raise ValueError(f"need n, n_reference, draws >= 2, got {n}, {n_reference}, {draws}")
    rng = np.random.default_rng(seed)
    samples = rng.multinomial(n, np.full(n, 1 / n), draws)
    reference = rng.multinomial(n_reference, np.full(n_reference, 1 / n_reference), draws)
    return JointPlan(samples, reference)


def joint_fid_draws(features: np.ndarray, reference: np.ndarray, plan: JointPlan) -> np.ndarray:
    """``FID(G*_b, R*_b)`` for each draw ``b`` of ``plan``: the generated set and the reference
    both resampled (``(B,)``). Methods scored with one plan can be differenced draw by draw
    (:func:`paired_difference`)."""
    features, reference = _as_features(features, "features"), _as_features(reference, "reference")
    if plan.samples.shape[1] != features.shape[0]:
        raise ValueError(f"the plan draws {plan.samples.shape[1]} images, got "
                         f"{features.shape[0]}: paired sets need the same seeds")
    if plan.reference.shape[1] != reference.shape[0]:
        raise ValueError(f"the plan draws {plan.reference.shape[1]} reference images, got "
                         f"{reference.shape[0]}")
    d = features.shape[1]
    out = np.empty(plan.samples.shape[0])
    chunk = max(1, _CHUNK_ELEMENTS // (d * d))
    for lo in range(0, out.shape[0], chunk):
        mus, covs = weighted_moments(features, plan.samples[lo : lo + chunk])
        ref_mus, ref_covs = weighted_moments(reference, plan.reference[lo : lo + chunk])
        with _one_blas_thread():
            roots = _psd_sqrt(ref_covs)
        out[lo : lo + chunk] = _frechet(mus, covs, ref_mus, roots,
                                        np.trace(ref_covs, axis1=-2, axis2=-1))
    return out


class Difference(NamedTuple):
    """``a - b`` with its interval, and ``shared``: the share of the unpaired variance
    ``var(a*) + var(b*)`` that pairing cancels, ``1 - var(a* - b*) / (var(a*) + var(b*))``."""

    value: float
    low: float
    high: float
    shared: float


COMPARE_BETTER = "better"
COMPARE_WORSE = "worse"
COMPARE_UNRESOLVED = "not resolved"


def paired_difference(
    value_a: float, value_b: float, draws_a: np.ndarray, draws_b: np.ndarray,
    confidence: float = 0.95,
) -> Difference:
    """``FID_a - FID_b`` with a pivotal interval from the draw-by-draw differences of a joint
    bootstrap (:func:`joint_fid_draws` of both sets under one :func:`joint_plan`): noise the two
    share (the same seeds, the same reference) cancels in ``d_b = FID*_a,b - FID*_b,b``, so the
    interval is narrower than two marginal ones overlapping would need."""
    draws_a, draws_b = np.asarray(draws_a, dtype=np.float64), np.asarray(draws_b, np.float64)
    if draws_a.shape != draws_b.shape or draws_a.ndim != 1 or draws_a.shape[0] < 2:
        raise ValueError(f"need two equal runs of >= 2 draws, got {draws_a.shape}, "
                         f"{draws_b.shape}")
    value = float(value_a - value_b)
    low, high = _pivot(value, draws_a - draws_b, confidence)
    unpaired = draws_a.var() + draws_b.var()
    shared = 1.0 - float((draws_a - draws_b).var() / unpaired) if unpaired > 0 else 0.0
    return Difference(value, low, high, shared)


def compare(difference: Difference) -> str:
    """``worse`` (``a`` has the higher FID: the interval is above 0), ``better`` (below 0) or
    ``not resolved`` (the interval holds 0)."""
    if difference.low > 0:
        return COMPARE_WORSE
    if difference.high < 0:
        return COMPARE_BETTER
    return COMPARE_UNRESOLVED


def fid_difference(
    a: np.ndarray,
    b: np.ndarray,
    reference: np.ndarray,
    *,
    draws: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """``FID(a, R) - FID(b, R)`` of two paired feature sets (row ``i`` of both from the same
    seed, or the same image before and after a change) with its joint-bootstrap interval."""
    a, b = _as_features(a, "a"), _as_features(b, "b")
    reference = _as_features(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"paired sets must have the same shape, got {a.shape} and {b.shape}")
    stats = ReferenceStatistics(reference)
    plan = joint_plan(a.shape[0], reference.shape[0], draws, seed)
    return paired_difference(stats.fid(a), stats.fid(b), joint_fid_draws(a, reference, plan),
                             joint_fid_draws(b, reference, plan), confidence)


def standardise(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(x - mean_R) / std_R`` per dimension, with the reference's mean and std (ddof 1).

    Dimensions that are constant on the reference are only centred (their std is taken as 1).
    """
    features = np.asarray(features, dtype=np.float64)
    reference = _as_features(reference, "reference")
    std = reference.std(axis=0, ddof=1)
    std = np.where(std > 1e-12, std, 1.0)
    return (features - reference.mean(axis=0)) / std


def kid_subset_size(*sizes: int, max_size: int = 1000) -> int:
    """The KID subset size: at most ``max_size`` and at most half of the smallest set (>= 2)."""
    return max(2, min(max_size, *(s // 2 for s in sizes)))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with ``k(a, b) = (a.b / D + 1)^3`` between equal-size sets."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(
    x: np.ndarray,
    y: np.ndarray,
    *,
    subset_size: int | None = None,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std of the unbiased MMD^2 over random subsets.

    Each subset draws ``subset_size`` rows of ``x`` and of ``y`` without replacement (default
    :func:`kid_subset_size`); pass features already standardised (:func:`standardise`).
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape} and {y.shape}")
    m = kid_subset_size(x.shape[0], y.shape[0]) if subset_size is None else subset_size
    if not 2 <= m <= min(x.shape[0], y.shape[0]):
        raise ValueError(f"subset_size must be in [2, {min(x.shape[0], y.shape[0])}], got {m}")
    if num_subsets < 2:
        raise ValueError(f"num_subsets must be >= 2, got {num_subsets}")
    rng = np.random.default_rng(seed)
    with _one_blas_thread():
        values = np.array(
            [
                _mmd2_unbiased(
                    x[rng.choice(x.shape[0], m, replace=False)],
                    y[rng.choice(y.shape[0], m, replace=False)],
                )
                for _ in range(num_subsets)
            ]
        )
    return float(values.mean()), float(values.std(ddof=1))


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _chunk_rows(cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(cols, 1))


def _kth_neighbour_sq(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row of ``x`` to its ``k``-th nearest other row."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}], got {k}")
    out = np.empty(x.shape[0])
    step = _chunk_rows(x.shape[0])
    for lo in range(0, x.shape[0], step):
        d = _pairwise_sq(x[lo : lo + step], x)
        out[lo : lo + step] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def _ball_counts(points: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray) -> np.ndarray:
    """For each point, the number of balls ``|p - c_i|^2 <= r_i^2`` that contain it."""
    counts = np.empty(points.shape[0], dtype=np.int64)
    step = _chunk_rows(centres.shape[0])
    for lo in range(0, points.shape[0], step):
        d = _pairwise_sq(points[lo : lo + step], centres)
        counts[lo : lo + step] = (d <= radii_sq[None, :]).sum(1)
    return counts


def prdc(real: np.ndarray, fake: np.ndarray, *, k_pr: int = 3, k_dc: int = 5) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi et al. 2019) and density, coverage (Naeem et al. 2020).

    With ``B(x, r_k(x))`` the ball around a sample reaching its ``k``-th nearest neighbour in its
    own set: precision = share of fakes inside some real ball (``k_pr``); recall = share of reals
    inside some fake ball (``k_pr``); density = ``1/(k M) sum_j #{i: fake_j in B(real_i)}``
    (``k_dc``); coverage = share of real balls (``k_dc``) holding at least one fake.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape} and {fake.shape}")
    real_pr, fake_pr = _kth_neighbour_sq(real, k_pr), _kth_neighbour_sq(fake, k_pr)
    real_dc = _kth_neighbour_sq(real, k_dc)
    precision = float((_ball_counts(fake, real, real_pr) > 0).mean())
    recall = float((_ball_counts(real, fake, fake_pr) > 0).mean())
    density = float(_ball_counts(fake, real, real_dc).sum() / (k_dc * fake.shape[0]))
    covered = np.zeros(real.shape[0], dtype=bool)
    step = _chunk_rows(fake.shape[0])
    for lo in range(0, real.shape[0], step):
        d = _pairwise_sq(real[lo : lo + step], fake)
        covered[lo : lo + step] = d.min(1) <= real_dc[lo : lo + step]
    return {
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": float(covered.mean()),
    }


def nearest_distances(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Euclidean distance from each row of ``queries`` to its nearest row of ``pool``."""
    queries = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    pool = np.asarray(pool, dtype=np.float64).reshape(len(pool), -1)
    if queries.shape[1] != pool.shape[1] or len(pool) == 0:
        raise ValueError(f"need a non-empty pool of equal width, got {queries.shape}, {pool.shape}")
    out = np.empty(queries.shape[0])
    step = _chunk_rows(pool.shape[0])
    for lo in range(0, queries.shape[0], step):
        out[lo : lo + step] = _pairwise_sq(queries[lo : lo + step], pool).min(1)
    return np.sqrt(out)


def near_copy_fraction(
    distances: np.ndarray, reference_distances: np.ndarray, quantile: float = 0.05
) -> tuple[float, float]:
    """Share of ``distances`` below the ``quantile`` of ``reference_distances``, and that threshold.

    ``reference_distances``: nearest-training distances of held-out real images (the reference
    half); a set of fresh real images scores about ``quantile``.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    threshold = float(np.quantile(np.asarray(reference_distances, dtype=np.float64), quantile))
    return float((np.asarray(distances) < threshold).mean()), threshold


def reference_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the reference half ``R`` and the floor half ``F`` of held-out images.

    Stratified: each class is permuted (``numpy`` generator seeded with ``seed``) and its first
    ``ceil(n_c / 2)`` go to ``R``. Both index arrays are sorted.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] < 4:
        raise ValueError(f"need >= 4 held-out images to split, got {labels.shape[0]}")
    rng = np.random.default_rng(seed)
    ref, floor = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        half = math.ceil(idx.shape[0] / 2)
        ref.append(idx[:half])
        floor.append(idx[half:])
    return np.sort(np.concatenate(ref)), np.sort(np.concatenate(floor))


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (Wilson 1927): the roots ``p`` of
    ``(k/n - p)^2 = z^2 p (1 - p) / n``; it stays inside [0, 1] and is not empty at 0 or n."""
    _check_confidence(confidence)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: no rounding below 0
    return low, 1.0 if k == n else min(1.0, centre + half)


def floor_position(fid: float, floor_low: float, floor_high: float) -> str:
    """Where ``fid`` lies against the floor's prediction interval ``[floor_low, floor_high]``:
    :data:`FLOOR_ABOVE` (the samples score worse than as many real images), :data:`FLOOR_BELOW`
    (better than real images: a sign of near copies) or :data:`FLOOR_INSIDE`."""
    if fid > floor_high:
        return FLOOR_ABOVE
    if fid < floor_low:
        return FLOOR_BELOW
    return FLOOR_INSIDE


def score_features(
    samples: np.ndarray,
    reference: np.ndarray,
    floor: np.ndarray,
    *,
    draws: int = 200,
    confidence: float = 0.95,
    kid_subsets: int = 100,
    seed: int = 0,
    callback: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Every feature-space score of ``samples`` against the reference half, with the floor half.

    Flat names: ``fid``, ``fid_ci_low``, ``fid_ci_high`` (:func:`fid_interval`); ``fid_floor``,
    ``fid_floor_ci_low``, ``fid_floor_ci_high``, ``fid_floor_slope`` (:func:`floor_fid` at
    ``m = fid_matched_n = min(n, |F|)``) and ``fid_matched``, the FID of the first ``m``
    samples, for :func:`floor_position`; ``kid_x1000``, ``kid_x1000_std``, ``kid_floor_x1000``,
    ``kid_floor_x1000_std`` with ``kid_subset_size`` (:func:`kid` on standardised features,
    the same subset size for both); ``precision``, ``recall``, ``density``, ``coverage`` and
    their ``*_floor`` values on the first ``prdc_n = min(n, |F|)`` images of each set
    (:func:`prdc`; both at the same size, since recall and coverage grow with it).
    ``callback(name)`` follows each of :data:`SCORES` (for progress: the bootstraps take the time).
    """
    done = callback if callback is not None else (lambda name: None)
    samples = _as_features(samples, "samples")
    reference, floor = _as_features(reference, "reference"), _as_features(floor, "floor")
    n = samples.shape[0]
    stats = ReferenceStatistics(reference)
    fid = fid_interval(samples, stats, draws=draws, confidence=confidence, seed=seed)
    done("fid")
    matched = min(n, floor.shape[0])
    fl = floor_fid(floor, stats, matched, draws=draws, confidence=confidence, seed=seed + 1)
    done("fid_floor")
    z_samples, z_ref, z_floor = (standardise(x, reference) for x in (samples, reference, floor))
    m = kid_subset_size(n, reference.shape[0], floor.shape[0])
    kid_s = kid(z_samples, z_ref, subset_size=m, num_subsets=kid_subsets, seed=seed)
    done("kid")
    kid_f = kid(z_floor, z_ref, subset_size=m, num_subsets=kid_subsets, seed=seed)
    done("kid_floor")
    m_pr = min(n, floor.shape[0])
    out = {
        "fid": fid.value,
        "fid_ci_low": fid.low,
        "fid_ci_high": fid.high,
        "fid_matched": fid.value if matched == n else stats.fid(samples[:matched]),
        "fid_matched_n": float(matched),
        "fid_floor": fl.value,
        "fid_floor_ci_low": fl.low,
        "fid_floor_ci_high": fl.high,
        "fid_floor_slope": fl.slope,
        "kid_x1000": 1000.0 * kid_s[0],
        "kid_x1000_std": 1000.0 * kid_s[1],
        "kid_floor_x1000": 1000.0 * kid_f[0],
        "kid_floor_x1000_std": 1000.0 * kid_f[1],
        "kid_subset_size": float(m),
        "prdc_n": float(m_pr),
    }
    out.update(prdc(z_ref, z_samples[:m_pr]))
    done("prdc")
    out.update({f"{k}_floor": v for k, v in prdc(z_ref, z_floor[:m_pr]).items()})
    done("prdc_floor")
    return out


def memorisation(
    samples: np.ndarray,
    train: np.ndarray,
    reference: np.ndarray,
    floor: np.ndarray,
    *,
    quantile: float = 0.05,
) -> dict[str, float]:
    """Near-copies of training images, in the space the arrays are given in (e.g. pixels).

    ``near_copy_fraction``: share of samples closer to their nearest training image than the
    ``quantile`` of the reference half's nearest-training distances; ``near_copy_fraction_heldout``
    the same for the floor half (about ``quantile`` for fresh real images);
    ``nn_train_distance_ratio``: median nearest-training distance of the samples over that of the
    floor half (below 1: samples sit closer to the training set than new real images do).
    """
    d_samples = nearest_distances(samples, train)
    d_ref = nearest_distances(reference, train)
    d_floor = nearest_distances(floor, train)
    fraction, threshold = near_copy_fraction(d_samples, d_ref, quantile)
    heldout, _ = near_copy_fraction(d_floor, d_ref, quantile)
    return {
        "near_copy_fraction": fraction,
        "near_copy_fraction_heldout": heldout,
        "near_copy_threshold": threshold,
        "nn_train_distance_ratio": float(np.median(d_samples) / np.median(d_floor)),
    }
