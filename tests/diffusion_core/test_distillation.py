"""Progressive distillation against the exact denoiser of Gaussian data N(mu, s^2 I).

For Gaussian data every DDIM step of the exact denoiser is affine in ``z_t``, so the teacher's
two-step map and the distillation target are affine too, and a per-time affine student
``out = a(t) x_in + b(t)`` (in any parameterisation) can represent the student of every round
exactly: what it learns is decided by the loss alone.
"""

import copy
import math

import pytest
import torch
from torch import nn

from diffusion_core.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from diffusion_core.denoiser import Denoiser, DenoiserOutput, process_coeffs
from diffusion_core.distillation import (
    distill_round,
    distillation_loss,
    distillation_target,
    sample_student_steps,
    start_round,
    student_grid,
)
from diffusion_core.ema import EMA
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.parameterization import eps_from_x0, training_target
from diffusion_core.processes import VESDE, VPSDE, DiscreteDDPM
from diffusion_core.samplers import ddim

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
STD = 0.5
N_SAMPLES = 4000


class AffineNet(nn.Module):
    """``out = a[k] x + b[k]`` with ``k`` the table time nearest to ``t``."""

    def __init__(self, times: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("times", times.double())
        self.a = nn.Parameter(torch.zeros(times.numel(), dim, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(times.numel(), dim, dtype=torch.float64))

    def forward(self, x, t, labels=None):
        k = (t.double()[:, None] - self.times[None]).abs().argmin(1)
        return self.a[k] * x + self.b[k]


def affine_copy(teacher, process, times, prediction):
    """A :class:`Denoiser` around an :class:`AffineNet` equal to ``teacher`` at ``times``
    (probed at network inputs 0 and 1: the teacher is affine in x_t)."""
    net = AffineNet(times, MU.numel())
    student = Denoiser(net, process, prediction)
    t = times[times > 0]
    for x_in, table in ((0.0, net.b), (1.0, net.a)):
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        x = torch.full((t.numel(), MU.numel()), x_in, dtype=torch.float64)
        x = x * torch.sqrt(alpha**2 + sigma**2)  # the network sees x * c_in = x_in
        out = teacher(x, t)
        with torch.no_grad():
            table[times > 0] = training_target(prediction, out.x0, out.eps, alpha, sigma)
    with torch.no_grad():
        net.a -= net.b
    return student


def exact_law(denoiser, process, grid):
    """Exact per-coordinate mean and std of DDIM's output for ``x_T ~ N(0, I)``: the map is
    affine, ``x_0 = A x_T + B``, probed at ``x_T = 0`` and ``x_T = 1``."""
    probe = torch.stack([torch.zeros_like(MU), torch.ones_like(MU)])
    x = ddim(denoiser, process, probe, grid).x
    return x[0], (x[1] - x[0]).abs()


def sampled_law(denoiser, process, grid, seed=7):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(N_SAMPLES, MU.numel(), generator=g, dtype=torch.float64)
    x = ddim(denoiser, process, x_T, grid).x
    return x.mean(0), x.std(0)


def within_sampling_error(sampled, exact):
    """Sample mean and std within 4 standard errors (``std/sqrt(n)``, ``std/sqrt(2n)``)."""
    (m, s), (m0, s0) = sampled, exact
    return bool(((m - m0).abs() < 4 * s0 / math.sqrt(N_SAMPLES)).all()
                and ((s - s0).abs() < 4 * s0 / math.sqrt(2 * N_SAMPLES)).all())


def gaussian_batch(seed):
    def batch(step):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        return MU + STD * torch.randn(512, MU.numel(), generator=g, dtype=torch.float64), None
    return batch


def train_round(student, teacher, process, grid, steps, lr=0.05, seed=0, round_index=0):
    opt = torch.optim.Adam(student.parameters(), lr=lr)

    def cosine(step):
        return 0.5 * lr * (1 + math.cos(math.pi * step / steps))
    return distill_round(student, teacher, process, opt, gaussian_batch(seed), grid, steps=steps,
                         seed=seed, round_index=round_index, lr=cosine)


# ------------------------------------------------------------------------------ the target
class FixedX0:
    """A denoiser whose x0 is a given tensor (eps consistent with it)."""

    def __init__(self, x0, process):
        self.x0, self.process = x0, process

    def __call__(self, x, t, labels=None):
        alpha, sigma, _ = process_coeffs(self.process, t, x)
        return DenoiserOutput(eps_from_x0(x, self.x0, alpha, sigma), self.x0)


def teachers():
    vp = VPSDE()
    mix = GaussianMixtureDenoiser(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), 0.3, vp)
    return {
        "vp": (GaussianDenoiser(MU, STD, vp), None),
        "ddpm": (GaussianDenoiser(MU, STD, DiscreteDDPM(64, "cosine")), None),
        "ve": (GaussianDenoiser(MU, STD, VESDE()), None),
        "guided": (ClassifierFreeGuidance(mix, 2.0), torch.tensor([0, 1, 0, 1, 1])),
    }


@pytest.mark.parametrize("name", list(teachers()))
def test_one_ddim_step_to_the_target_lands_on_the_teachers_two_steps(name):
    teacher, labels = teachers()[name]
    process = teacher.process
    grid = process.time_grid(8, "trailing")
    g = torch.Generator().manual_seed(1)
    z = process.prior_std * torch.randn(5, 2, generator=g, dtype=torch.float64)
    for i in range(0, 8, 2):  # every student step, the last one ending at t'' = 0
        t, t_mid, t_next = (grid[i + k].expand(5) for k in range(3))
        target = distillation_target(teacher, process, z, t, t_mid, t_next, labels)
        one = ddim(FixedX0(target, process), process, z, grid[[i, i + 2]], labels=labels).x
        two = ddim(teacher, process, z, grid[i:i + 3], labels=labels).x
        torch.testing.assert_close(one, two, atol=1e-10, rtol=1e-10)
        assert not torch.allclose(target, teacher(z, grid[i], labels).x0)  # a real correction


def test_targets_of_mixed_steps_in_one_batch_equal_those_of_each_step():
    teacher, _ = teachers()["vp"]
    grid = VPSDE().time_grid(8, "trailing")
    t, t_mid, t_next = sample_student_steps(grid, 64, torch.Generator().manual_seed(0))
    assert set(t_next.tolist()) == set(student_grid(grid)[1:].tolist())
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mixed = distillation_target(teacher, teacher.process, z, t, t_mid, t_next)
    for k in range(64):
        one = distillation_target(teacher, teacher.process, z[k:k + 1], t[k:k + 1],
                                  t_mid[k:k + 1], t_next[k:k + 1])
        torch.testing.assert_close(mixed[k:k + 1], one, atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------- the loss
class TwoStepStudent:
    """The ideal student: its x0 at a student time is the target of that step."""

    def __init__(self, teacher, grid):
        self.teacher, self.process, self.grid = teacher, teacher.process, grid

    def __call__(self, x, t, labels=None):
        i = (t[:, None] - self.grid[None]).abs().argmin(1)
        x0 = distillation_target(self.teacher, self.process, x, self.grid[i],
                                 self.grid[i + 1], self.grid[i + 2], labels)
        return FixedX0(x0, self.process)(x, t)


@pytest.mark.parametrize("weighting", ["truncated_snr", "snr_plus_one"])
def test_loss_is_zero_for_the_two_step_map_and_positive_otherwise(weighting):
    teacher, _ = teachers()["vp"]
    grid = teacher.process.time_grid(8, "trailing")
    x0, _ = gaussian_batch(3)(0)

    def loss(student):
        return float(distillation_loss(student, teacher, teacher.process, x0, grid,
                                       weighting=weighting,
                                       generator=torch.Generator().manual_seed(0)))
    assert loss(TwoStepStudent(teacher, grid)) < 1e-20
    assert loss(teacher) > 1e-3  # the undistilled teacher takes one step where it needs two


@pytest.mark.parametrize("weighting", ["truncated_snr", "snr_plus_one"])
def test_loss_weights_the_x0_error_by_the_papers_weighting(weighting):
    teacher, _ = teachers()["ddpm"]
    process, grid, delta = teacher.process, teacher.process.time_grid(16, "trailing"), 0.3
    ideal = TwoStepStudent(teacher, grid)

    def shifted(x, t, labels=None):  # an x0 error of exactly delta everywhere
        return FixedX0(ideal(x, t).x0 + delta, process)(x, t)
    x0, _ = gaussian_batch(4)(0)
    got = distillation_loss(shifted, teacher, process, x0, grid, weighting=weighting,
                            generator=torch.Generator().manual_seed(5))
    t, _, _ = sample_student_steps(grid, x0.shape[0], torch.Generator().manual_seed(5))
    snr = process.alpha(t) ** 2 / process.sigma(t) ** 2
    w = snr.clamp(min=1.0) if weighting == "truncated_snr" else snr + 1.0
    assert float(got) == pytest.approx(delta**2 * float(w.mean()), rel=1e-10)
    assert float(snr.min()) < 1e-3 and float(snr.max()) > 10.0  # both sides of SNR = 1 drawn


def test_a_resumed_round_equals_an_uninterrupted_one():
    process = VPSDE()
    teacher = GaussianDenoiser(MU, STD, process)
    grid = process.time_grid(8, "trailing")

    def run(stops):
        student = affine_copy(teacher, process, grid, "v")
        state = None
        for start, stop in stops:
            opt = torch.optim.Adam(student.parameters(), lr=0.01)
            ema = EMA(student, decay=0.9)
            if state is not None:  # a fresh process restores the checkpointed state
                student.load_state_dict(state[0])
                opt.load_state_dict(state[1])
                ema.load_state_dict(state[2])
            distill_round(student, teacher, process, opt, gaussian_batch(2), grid, steps=stop,
                          seed=3, start_step=start, ema=ema)
            state = copy.deepcopy((student.state_dict(), opt.state_dict(), ema.state_dict()))
        return state
    straight, resumed = run([(0, 12)]), run([(0, 5), (5, 12)])
    for key in straight[0]:
        assert torch.equal(straight[0][key], resumed[0][key])
        assert torch.equal(straight[2]["module"][key], resumed[2]["module"][key])
    assert resumed[2]["num_updates"] == 12


# ------------------------------------------------------------------------- one round, N -> N/2
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_one_round_halves_the_steps_with_the_teachers_output_law(prediction):
    process = VPSDE()
    teacher = GaussianDenoiser(MU, STD, process)
    grid = process.time_grid(4, "trailing")
    half = student_grid(grid)
    student = affine_copy(teacher, process, grid, prediction)  # starts as the teacher
    target_law = exact_law(teacher, process, grid)
    undistilled = exact_law(teacher, process, half)
    # the two laws differ by far more than the sampling error: the test separates them
    assert not within_sampling_error(undistilled, target_law)
    assert within_sampling_error(exact_law(student, process, half), undistilled)

    train_round(student, teacher, process, grid, steps=300)

    for got, want in zip(exact_law(student, process, half), target_law, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert within_sampling_error(sampled_law(student, process, half), target_law)
    assert not within_sampling_error(sampled_law(teacher, process, half), target_law)


# --------------------------------------------------------------------- rounds, 64 -> 2 -> 1 step
def test_rounds_reach_the_data_distribution_in_one_and_two_steps():
    process = DiscreteDDPM(64, "cosine")
    data_law = (MU, torch.full_like(MU, STD))
    exact_teacher = GaussianDenoiser(MU, STD, process)
    grid = process.time_grid(64, "trailing")
    teacher_law = exact_law(exact_teacher, process, grid)
    # the 64-step teacher is the data distribution at the resolution of N_SAMPLES samples
    assert within_sampling_error(teacher_law, data_law)
    teacher = affine_copy(exact_teacher, process, grid, "v")
    students = {}
    for r in range(6):
        student = start_round(teacher)
        train_round(student, teacher, process, grid, steps=200, round_index=r)
        grid, teacher = student_grid(grid), student
        students[grid.numel() - 1] = (student, grid)
    for steps in (2, 1):
        student, grid = students[steps]
        assert grid.tolist() == process.time_grid(steps, "trailing").tolist()
        for got, want in zip(exact_law(student, process, grid), teacher_law, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert within_sampling_error(sampled_law(student, process, grid), data_law)
        assert not within_sampling_error(sampled_law(exact_teacher, process, grid), data_law)


def test_trailing_grids_halve_into_trailing_grids():
    for process in (VPSDE(), DiscreteDDPM(1000), DiscreteDDPM(64, "cosine")):
        for steps in (64, 16, 8, 2):
            assert torch.equal(student_grid(process.time_grid(steps, "trailing")),
                               process.time_grid(steps // 2, "trailing"))
    with pytest.raises(ValueError, match="even number"):
        student_grid(VPSDE().time_grid(3, "trailing"))
