"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student that takes ONE deterministic DDIM step where its
teacher takes two, so each round halves the steps (N -> N/2 -> ... -> 1).

For a student step ``t -> t''`` on the student's grid (every other point of the teacher's grid
``... > t > t' > t'' > ...``), with ``z_t = alpha_t x + sigma_t eps``:

    z_t'  = alpha_t'  x^(z_t)  + sigma_t'  eps^(z_t)        (teacher DDIM step, eta = 0)
    z_t'' = alpha_t'' x^(z_t') + sigma_t'' eps^(z_t')       (teacher DDIM step, eta = 0)
    x~    = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    L     = w(t) || x^_student(z_t) - x~ ||^2,   w(t) = max(SNR(t), 1)   (truncated SNR)

``x~`` is the ``x_0`` that makes one DDIM step from ``z_t`` land exactly on the teacher's
``z_t''``. The student is sampled by the existing :func:`~diffusion_core.samplers.ddim` with
``eta = 0`` on its grid (:func:`student_grid`); no new sampler is needed. For ``trailing``
spacing (the paper's grid ``t_i = i/N``) ``process.time_grid(S, "trailing")[::2]`` is
``process.time_grid(S // 2, "trailing")``, so a student of S/2 steps is sampled by the
standard ``generate(..., "ddim", steps=S // 2, spacing="trailing")``.

The student may predict ``eps``, ``x0`` or ``v`` (it is a :class:`~diffusion_core.denoiser.
Denoiser`; the loss only reads its ``x0``). The paper recommends ``v`` or ``x0`` output: an eps
student's ``x0 = (z_t - sigma_t eps) / alpha_t`` amplifies its errors by ``1/alpha_t`` at the
noisiest student step, which in a 1-4 step sampler is a large share of the work (Sec. 4); it
works here (our processes keep ``alpha(1) > 0``) but is ill-conditioned there.

Classifier-free guidance: pass the teacher wrapped in
:class:`~diffusion_core.guidance.ClassifierFreeGuidance`; the target is computed through whatever
denoiser is passed, so the student learns the guided two-step map of that one ``w`` in one
forward pass per step (Meng et al. 2023, "On Distillation of Guided Diffusion Models", first make
the student ``w``-conditioned; not done here). Nothing here knows about guidance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from diffusion_core.denoiser import DenoiserLike
from diffusion_core.ema import EMA
from diffusion_core.processes import NoiseProcess, broadcast
from diffusion_core.training import derive_seed

DistillWeighting = Literal["truncated_snr", "snr_plus_one"]
DISTILL_WEIGHTINGS: tuple[str, ...] = get_args(DistillWeighting)
#: ``batch(step) -> (x0, labels)``: the data of one optimiser step (``labels`` may be None)
BatchFn = Callable[[int], tuple[Tensor, Tensor | None]]


def student_grid(teacher_grid: Tensor) -> Tensor:
    """Every other point of the teacher's descending grid ``[t_0, ..., t_N = 0]`` (N even):
    ``[t_0, t_2, ..., t_N]``, the grid of a student with N/2 steps."""
    steps = teacher_grid.numel() - 1
    if steps < 2 or steps % 2:
        raise ValueError(f"the teacher's grid needs an even number of steps >= 2, got {steps}")
    if float(teacher_grid[-1]) != 0.0:
        raise ValueError("the teacher's grid must end at t = 0")
    return teacher_grid[::2].clone()


def grid_coeffs(process: NoiseProcess, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha(t), sigma(t))`` per sample, broadcast against ``x``, with the grid's final time
    ``t = 0`` read as the clean image ``(1, 0)``: DDIM's last step returns ``x0`` (for VE,
    ``sigma(0) = sigma_min``, so the process's own value would not be the clean image)."""
    t = t.to(torch.float64)
    end = t <= 0
    alpha = torch.where(end, torch.ones_like(t), process.alpha(t))
    sigma = torch.where(end, torch.zeros_like(t), process.sigma(t))
    return broadcast(alpha, x), broadcast(sigma, x)


def ddim_step(denoiser: DenoiserLike, process: NoiseProcess, z: Tensor, t: Tensor, s: Tensor,
              labels: Tensor | None = None) -> Tensor:
    """One deterministic DDIM step ``z_s = alpha_s x^(z_t) + sigma_s eps^(z_t)`` (Song et al.
    2021, eq. 12 with eta = 0) for per-sample times ``t, s`` of shape ``(B,)``; ``s = 0`` gives
    ``x^``. The update of :func:`~diffusion_core.samplers.ddim` (which steps one host-side time
    for the whole batch) for a batch whose samples sit at different steps."""
    out = denoiser(z, t, labels)
    alpha_s, sigma_s = grid_coeffs(process, s, z)
    return alpha_s * out.x0 + sigma_s * out.eps


def target_from_two_steps(process: NoiseProcess, z_t: Tensor, z_next: Tensor, t: Tensor,
                          t_next: Tensor) -> Tensor:
    """``x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)``
    (Salimans & Ho 2022, Algorithm 2): solve ``z_t'' = alpha_t'' x~ + sigma_t'' (z_t - alpha_t
    x~) / sigma_t`` (one DDIM step from ``z_t`` with ``x0 = x~``) for ``x~``. At ``t'' = 0``
    (``alpha = 1, sigma = 0``) it is ``z_0``, the teacher's last ``x0``, as the official code's
    ``where(i == 0, x_pred, x_target)``."""
    alpha_t, sigma_t = grid_coeffs(process, t, z_t)
    alpha_n, sigma_n = grid_coeffs(process, t_next, z_t)
    ratio = sigma_n / sigma_t
    return (z_next - ratio * z_t) / (alpha_n - ratio * alpha_t)


@torch.no_grad()
def distillation_target(teacher: DenoiserLike, process: NoiseProcess, z_t: Tensor, t: Tensor,
                        t_mid: Tensor, t_next: Tensor, labels: Tensor | None = None) -> Tensor:
    """The student's ``x0`` target at ``z_t``: two teacher DDIM steps ``t -> t' -> t''``
    (:func:`ddim_step`), then :func:`target_from_two_steps`. Times are per sample, ``(B,)``.
    ``teacher`` is any denoiser: a guided one gives the guided target."""
    z_mid = ddim_step(teacher, process, z_t, t, t_mid, labels)
    z_next = ddim_step(teacher, process, z_mid, t_mid, t_next, labels)
    return target_from_two_steps(process, z_t, z_next, t, t_next)


def distillation_weight(process: NoiseProcess, t: Tensor,
                        weighting: str = "truncated_snr") -> Tensor:
    """``w(t)`` on the x0 error (Salimans & Ho 2022, Sec. 4): ``truncated_snr``
    ``max(SNR, 1)`` (= ``max(||d x0||^2, ||d eps||^2)``, the paper's choice for distillation) or
    ``snr_plus_one`` ``SNR + 1`` (= the v error for VP). Both keep weight at ``SNR -> 0``, where
    a few-step student's first step works and the plain SNR weight (the eps loss) vanishes."""
    snr = torch.exp(process.log_snr(t.to(torch.float64)))
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    raise ValueError(f"unknown distillation weighting {weighting!r}: "
                     f"choose one of {list(DISTILL_WEIGHTINGS)}")


def sample_student_steps(teacher_grid: Tensor, n: int, generator: torch.Generator | None = None,
                         device=None) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, t', t'')`` of ``n`` student steps drawn uniformly from the student's N/2 steps:
    ``t = t_{2i}``, ``t' = t_{2i+1}``, ``t'' = t_{2i+2}`` on the teacher's grid."""
    student = student_grid(teacher_grid)  # checks the grid
    dev = generator.device if generator is not None else device
    i = torch.randint(0, student.numel() - 1, (n,), generator=generator, device=dev).cpu()
    grid = teacher_grid.to(torch.float64).cpu()
    return tuple(grid[2 * i + k].to(device) for k in range(3))  # type: ignore[return-value]


def distillation_loss(student: DenoiserLike, teacher: DenoiserLike, process: NoiseProcess,
                      x0: Tensor, teacher_grid: Tensor, labels: Tensor | None = None, *,
                      weighting: str = "truncated_snr",
                      generator: torch.Generator | None = None) -> Tensor:
    """Algorithm 2's loss on one batch: a student step per sample
    (:func:`sample_student_steps`), ``z_t = alpha_t x0 + sigma_t eps``, the target
    (:func:`distillation_target`, no gradient) and ``mean w(t) ||x^_student(z_t) - x~||^2``
    (squared error averaged over pixels). All randomness comes from ``generator``."""
    t, t_mid, t_next = sample_student_steps(teacher_grid, x0.shape[0], generator, x0.device)
    dev = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype).to(x0.device)
    z_t = process.marginal(x0, t, eps)
    target = distillation_target(teacher, process, z_t, t, t_mid, t_next, labels)
    pred = student(z_t, t, labels).x0
    dtype = torch.promote_types(pred.dtype, torch.float32)
    err = (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    return (distillation_weight(process, t, weighting).to(err) * err).mean()


def start_round(teacher: nn.Module) -> nn.Module:
    """The student of a round: a trainable copy of the teacher (Algorithm 2: "init student from
    teacher"). The teacher itself is frozen (eval mode, no gradients) in place."""
    teacher.eval().requires_grad_(False)
    return copy.deepcopy(teacher).train().requires_grad_(True)


def distill_step(student: nn.Module, teacher: DenoiserLike, process: NoiseProcess,
                 optimizer: torch.optim.Optimizer, x0: Tensor, teacher_grid: Tensor,
                 labels: Tensor | None = None, *, generator: torch.Generator | None = None,
                 weighting: str = "truncated_snr", ema: EMA | None = None,
                 grad_clip: float = 0.0) -> float:
    """One optimiser step on :func:`distillation_loss` (gradient norm clipped to ``grad_clip``
    when > 0), then the EMA update if given; returns the loss."""
    loss = distillation_loss(student, teacher, process, x0, teacher_grid, labels,
                             weighting=weighting, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update(student)
    return float(loss.detach())


def step_generator(seed: int, round_index: int, step: int, device=None) -> torch.Generator:
    """The generator of one distillation step, seeded by ``(seed, "distill", round, step)``:
    a resumed round draws exactly the noise and times it would have drawn."""
    g = torch.Generator(device=device or "cpu")
    return g.manual_seed(derive_seed(seed, "distill", round_index, step))


def distill_round(student: nn.Module, teacher: DenoiserLike, process: NoiseProcess,
                  optimizer: torch.optim.Optimizer, batch: BatchFn, teacher_grid: Tensor, *,
                  steps: int, seed: int, round_index: int = 0, start_step: int = 0,
                  weighting: str = "truncated_snr", ema: EMA | None = None,
                  grad_clip: float = 0.0, lr: Callable[[int], float] | None = None,
                  callback: Callable[[int, float], None] | None = None) -> float:
    """Steps ``start_step .. steps - 1`` of one round: ``batch(step)`` gives the data, the noise
    and times come from :func:`step_generator`, ``lr(step)`` (if given) sets the learning rate.
    The state is the caller's (student, optimizer, EMA, step) and ``batch`` must depend on the
    step only, so a round resumes exactly from a checkpoint of that state at any step.
    ``callback(step, loss)`` runs after each step (logging, checkpointing). Returns the last loss
    (nan if no step ran). The next round's teacher is this student (or its EMA), on the grid
    :func:`student_grid` of this round's."""
    loss = float("nan")
    for step in range(start_step, steps):
        x0, labels = batch(step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr(step)
        loss = distill_step(student, teacher, process, optimizer, x0, teacher_grid, labels,
                            generator=step_generator(seed, round_index, step, x0.device),
                            weighting=weighting, ema=ema, grad_clip=grad_clip)
        if callback is not None:
            callback(step, loss)
    return loss
