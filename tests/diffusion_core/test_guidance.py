"""Classifier-free guidance against class-conditional Gaussian data."""

import pytest
import torch
from _impulse_rng import ImpulseRNG
from torch import nn

from diffusion_core.analytic import GaussianMixtureDenoiser
from diffusion_core.denoiser import ClipX0, Denoiser, DenoiserOutput
from diffusion_core.guidance import AutoGuidance, ClassifierFreeGuidance
from diffusion_core.losses import drop_labels
from diffusion_core.processes import VPSDE, DiscreteDDPM
from diffusion_core.rng import StackedRNG
from diffusion_core.samplers import SAMPLERS, generate

MEANS = torch.tensor([[-1.0, 0.5], [0.8, -0.6], [0.0, 1.0]]).reshape(3, 1, 1, 2)
STD = 0.3


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_guided_eps_equals_closed_form_score(w):
    """eps~ = -sigma [(1+w) grad log p_t(x|c) - w grad log p_t(x)], scores by autograd."""
    p = VPSDE()
    d = GaussianMixtureDenoiser(MEANS, STD, p)
    guided = ClassifierFreeGuidance(d, w)
    x = torch.randn(12, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(12) % 3
    t = torch.full((12,), 0.4, dtype=torch.float64)
    grad_c = torch.autograd.grad(d.log_prob(x, t, labels).sum(), x)[0]
    grad_u = torch.autograd.grad(d.log_prob(x, t, None).sum(), x)[0]
    sigma = p.sigma(t[0]).item()
    expected = -sigma * ((1 + w) * grad_c - w * grad_u)
    out = guided(x.detach(), t, labels)
    assert torch.allclose(out.eps.double(), expected, atol=1e-8)
    # and x0 is consistent with eps through x = alpha x0 + sigma eps
    alpha = p.alpha(t[0]).item()
    assert torch.allclose(alpha * out.x0 + sigma * out.eps, x.detach(), atol=1e-10)


def exact_law(sampler, make_denoiser, process, grid, label=None, **kw):
    """Exact per-pixel mean and std of a sampler's output for ``x_T ~ prior`` when the (guided)
    denoiser is affine in x, as for Gaussian data: ``x_0 = A x_T + b + sum_k C_k z_k``; image 0
    (x_T = 0, no noise) gives b, image 1 (x_T = 1) A + b, image k + 2 (only z_k = 1) C_k + b.
    ``make_denoiser()`` gives a fresh denoiser for each of the two runs."""
    shape = (1, 1, 2)

    def run(n, rng):
        labels = None if label is None else torch.full((n,), label)
        x_T = torch.zeros(n, *shape, dtype=torch.float64)
        x_T[1] = 1.0
        return SAMPLERS[sampler](make_denoiser(), process, x_T, grid, labels=labels, rng=rng,
                                 **kw).x

    probe = ImpulseRNG(2)
    run(2, probe)
    x = run(probe.calls + 2, ImpulseRNG(probe.calls + 2))
    b, a, c = x[0], x[1] - x[0], x[2:] - x[0]
    return b, (a**2 * process.prior_std**2 + (c**2).sum(0)).sqrt()


# (sampler, steps, band of the std's relative error, max |mean error|). The laws are exact, so
# the bands hold only the discretisation error, measured -2.35 %, -1.78 % and +1.16 % (mean
# errors 0, 1.8e-3 and 4.1e-3); a denoiser evaluated one step late gives -6.9 %, -72 % and
# +0.05 % (mean error 1.5e-2 for Heun).
W_ZERO = [("ddpm", 500, (-0.03, -0.015), 1e-3), ("ddim", 250, (-0.025, -0.01), 3e-3),
          ("ode_heun", 100, (0.005, 0.02), 6e-3)]


@pytest.mark.parametrize(("sampler", "steps", "band", "mean_tol"), W_ZERO,
                         ids=[c[0] for c in W_ZERO])
def test_w_zero_reproduces_each_class(sampler, steps, band, mean_tol):
    p = DiscreteDDPM(500)
    for c in range(3):
        mean, std = exact_law(
            sampler, lambda: ClassifierFreeGuidance(GaussianMixtureDenoiser(MEANS, STD, p), 0.0),
            p, p.time_grid(steps), label=c)
        err = std.mean().item() / STD - 1
        assert band[0] < err < band[1], (c, err)
        assert (mean - MEANS[c, 0]).abs().max().item() < mean_tol, c


class SpreadGuidance:
    """Exact denoiser of N(mean, s^2) for label 0 and of N(mean, s0^2) for the null label 1: a
    class-conditional model whose guidance only changes the spread, so the guided denoiser stays
    affine in x."""

    num_classes, null_label = 1, 1

    def __init__(self, mean, s, s0, process):
        self.process = process
        self.cond = GaussianMixtureDenoiser(mean[None], s, process)
        self.null = GaussianMixtureDenoiser(mean[None], s0, process)

    def __call__(self, x, t, labels=None):
        c, u = self.cond(x, t), self.null(x, t)
        if labels is None:
            return u
        pick = (labels == 0).reshape(-1, *[1] * (x.dim() - 1))
        return DenoiserOutput(torch.where(pick, c.eps, u.eps), torch.where(pick, c.x0, u.x0))


def guided_ode_std(process, t_start, s, s0, w, prior_std):
    """Std of the probability-flow ODE's output under the guided eps of two Gaussians with one
    mean, N(mu, s^2) guided away from N(mu, s0^2) with weight w, started from N(0, prior_std^2)
    at t_start. In xb = x / alpha and sb = sigma / alpha the ODE is dxb/dsb = eps~, with
    eps~ = sb (xb - mu) [(1 + w) / (s^2 + sb^2) - w / (s0^2 + sb^2)], so
    (xb - mu) * (s^2 + sb^2)^-(1+w)/2 * (s0^2 + sb^2)^(w/2) is constant along it."""
    t = torch.tensor(float(t_start), dtype=torch.float64)
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    sb2 = (sigma / alpha) ** 2
    gain = s ** (1 + w) * s0 ** (-w) * (s**2 + sb2) ** (-(1 + w) / 2) * (s0**2 + sb2) ** (w / 2)
    return prior_std / alpha * gain


@pytest.mark.parametrize("kind", ["classifier_free", "auto"])
@pytest.mark.parametrize("w", [0.5, 1.0, 2.0])
def test_guided_ode_matches_the_closed_form(kind, w):
    """Heun (100 steps, VP) on the guided ODE of two one-mean Gaussians (std 0.3, guided away
    from std 0.6) against its closed-form output std, 0.3^(1+w) / 0.6^w: measured errors
    +0.08 %, +0.15 %, +0.36 % at w = 0.5, 1, 2 (mean errors <= 8e-4). The guided denoiser one
    step late gives -1.4 % to -1.7 % (mean errors 3e-3 to 5e-3); the unconditional (or guide)
    output of the previous step +2.2 %, +4.8 %, +12 %."""
    p, mean = VPSDE(), torch.tensor([[[0.5, -0.5]]])
    grid = p.time_grid(100)
    if kind == "auto":
        def make():
            return AutoGuidance(GaussianMixtureDenoiser(mean[None], STD, p),
                                GaussianMixtureDenoiser(mean[None], 2 * STD, p), w)
        label = None
    else:
        def make():
            return ClassifierFreeGuidance(SpreadGuidance(mean, STD, 2 * STD, p), w)
        label = 0
    got_mean, std = exact_law("ode_heun", make, p, grid, label=label)
    expected = guided_ode_std(p, grid[0], STD, 2 * STD, w, p.prior_std)
    assert expected == pytest.approx(STD ** (1 + w) / (2 * STD) ** w, rel=1e-3)
    err = std.mean().item() / expected - 1
    assert -0.002 < err < 0.006, err
    assert (got_mean - mean).abs().max().item() < 1.5e-3


def test_guidance_pushes_samples_towards_their_class():
    p = DiscreteDDPM(100)
    d = GaussianMixtureDenoiser(MEANS, STD, p)
    labels = torch.arange(900) % 3
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(900, 1, 1, 2, generator=g)
    spread = []
    for w in (0.0, 3.0):
        x = SAMPLERS["ddim"](ClassifierFreeGuidance(d, w), p, x_T, p.time_grid(50),
                             labels=labels).x
        spread.append(torch.stack([x[labels == c].std(0).mean() for c in range(3)]).mean())
    assert spread[1] < 0.8 * spread[0]


def test_unconditional_call_uses_null_label():
    p = VPSDE()
    d = GaussianMixtureDenoiser(MEANS, STD, p)
    x = torch.randn(6, 1, 1, 2)
    null = torch.full((6,), 3)
    guided = ClassifierFreeGuidance(d, 2.0)
    assert torch.allclose(guided(x, 0.5, None).eps, d(x, 0.5, null).eps)


class TinyConditionalNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes, self.null_label = num_classes, num_classes
        self.emb = nn.Embedding(num_classes + 1, 4)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_label)
        e = self.emb(labels).sum(1).reshape(-1, 1, 1, 1)
        return self.conv(x) * (1 + t.reshape(-1, 1, 1, 1)) + e


def test_batched_guided_forward_equals_two_separate_forwards():
    torch.manual_seed(0)
    net = TinyConditionalNet()
    p = DiscreteDDPM(100)
    den = Denoiser(net, p, "eps")
    x = torch.randn(5, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    w = 1.5
    net.calls = 0
    out = ClassifierFreeGuidance(den, w)(x, 0.3, labels)
    assert net.calls == 1  # one batched forward
    cond = den(x, 0.3, labels).eps
    uncond = den(x, 0.3, torch.full_like(labels, 3)).eps
    assert torch.allclose(out.eps, (1 + w) * cond - w * uncond, atol=1e-6)


def test_scale_convention():
    p = VPSDE()
    d = GaussianMixtureDenoiser(MEANS, STD, p)
    assert ClassifierFreeGuidance.from_scale(d, 3.0).w == 2.0
    # from_scale keeps every option of the constructor
    assert ClassifierFreeGuidance.from_scale(d, 3.0, null_label=1).null_label == 1
    with pytest.raises(ValueError, match="w must be"):
        ClassifierFreeGuidance(d, -1.0)


def test_label_dropout_rate_and_null_label():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (200_000,), generator=g)
    dropped = drop_labels(labels, 0.2, 10, g)
    frac = (dropped == 10).float().mean().item()
    assert frac == pytest.approx(0.2, abs=0.005)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    assert not (labels == 10).any()  # the null label is never a dataset class
    assert torch.equal(drop_labels(labels, 0.0, 10, g), labels)


# ------------------------------------------------------------------------------ x0 clipping
WIDE = 3.0 * MEANS  # class means outside [-1, 1], so clipping has something to do


def test_clip_x0_clamps_and_keeps_eps_consistent():
    p = VPSDE()
    d = GaussianMixtureDenoiser(WIDE, STD, p)
    x = 2 * torch.randn(64, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 3
    t = torch.full((64,), 0.3, dtype=torch.float64)
    raw, out = d(x, t, labels), ClipX0(d)(x, t, labels)
    a, s = p.alpha(t[0]).item(), p.sigma(t[0]).item()
    assert torch.equal(out.x0, raw.x0.clamp(-1, 1))
    assert (raw.x0.abs() > 1).any()
    assert torch.allclose(a * out.x0 + s * out.eps, x, atol=1e-12)
    inside = raw.x0.abs() <= 1
    assert torch.allclose(out.eps[inside], raw.eps[inside], atol=1e-12)


def test_clipping_is_applied_once_after_guidance():
    """generate(clip_x0=True) clips the GUIDED x0 once: clip(guide(eps_c, eps_u)), which differs
    from guiding two clipped predictions."""
    p = DiscreteDDPM(100)
    d = GaussianMixtureDenoiser(WIDE, STD, p)
    guided = ClassifierFreeGuidance(d, 2.0)
    labels = torch.arange(16) % 3
    kw = {"shape": (1, 1, 2), "seeds": range(16), "labels": labels, "steps": 10}
    res = generate(guided, p, "ddim", clip_x0=True, **kw).x
    seen = []
    generate(guided, p, "ddim", clip_x0=True, callback=lambda c: seen.append(c["x0_pred"]), **kw)
    assert all(x0.abs().max() <= 1 for x0 in seen)
    x_T = p.prior_sample((16, 1, 1, 2), StackedRNG(range(16)))
    grid = p.time_grid(10)
    once = SAMPLERS["ddim"](ClipX0(guided), p, x_T, grid, labels=labels).x
    inner = SAMPLERS["ddim"](ClassifierFreeGuidance(ClipX0(d), 2.0, null_label=3), p, x_T, grid,
                             labels=labels).x
    assert torch.allclose(res, once, atol=1e-6)
    assert not torch.allclose(once, inner, atol=1e-3)
    # off by default: the unclipped sampler leaves the data range
    free = generate(guided, p, "ddim", **kw).x
    assert free.abs().max() > 1.5 and res.abs().max() <= 1.0 + 1e-6


def test_denoiser_and_guidance_have_no_clipping_of_their_own():
    import inspect

    assert "clip" not in str(inspect.signature(Denoiser))
    assert "clip" not in str(inspect.signature(ClassifierFreeGuidance))


# ------------------------------------------------------------------------------ autoguidance
@pytest.mark.parametrize("w", [0.0, 0.7, 2.0])
def test_autoguided_eps_is_the_tilted_score(w):
    """eps~ = -sigma [(1+w) grad log p_t(x) - w grad log p0_t(x)]: p the model's data (std 0.3),
    p0 the weak guide's (std 0.6), scores by autograd (Karras et al. 2024, eq. 2)."""
    p = VPSDE()
    good = GaussianMixtureDenoiser(MEANS, STD, p)
    weak = GaussianMixtureDenoiser(MEANS, 2 * STD, p)
    guided = AutoGuidance(good, weak, w)
    x = torch.randn(12, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    t = torch.full((12,), 0.3, dtype=torch.float64)
    grad_1 = torch.autograd.grad(good.log_prob(x, t, None).sum(), x)[0]
    grad_0 = torch.autograd.grad(weak.log_prob(x, t, None).sum(), x)[0]
    sigma, alpha = p.sigma(t[0]).item(), p.alpha(t[0]).item()
    out = guided(x.detach(), t)
    assert torch.allclose(out.eps.double(), -sigma * ((1 + w) * grad_1 - w * grad_0), atol=1e-8)
    assert torch.allclose(alpha * out.x0 + sigma * out.eps, x.detach(), atol=1e-10)


def test_autoguidance_sharpens_towards_the_good_model():
    """Gaussian data: DDIM's autoguided samples are narrower than the model's own (the guide is
    wider), at the closed-form std 0.3^2 / 0.6 = 0.15 of the guided ODE, and keep the mean;
    with the guide equal to the model nothing changes. Exact laws: DDIM-100 measured -4.2 %
    (model alone) and -7.5 % (guided) from the ODE's output; a guided denoiser one step late
    gives -89 %, a guide output one step late +1.3 %."""
    p = DiscreteDDPM(200)
    mean = torch.tensor([[[[0.5, -0.5]]]])
    good = GaussianMixtureDenoiser(mean, STD, p)
    weak = GaussianMixtureDenoiser(mean, 2 * STD, p)
    x_T = torch.randn(64, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    grid = p.time_grid(100)
    plain = SAMPLERS["ddim"](good, p, x_T, grid).x
    same = SAMPLERS["ddim"](AutoGuidance(good, good, 1.5), p, x_T, grid).x
    assert torch.allclose(same, plain, atol=1e-5)
    _, model_std = exact_law("ddim", lambda: good, p, grid)
    sharp_mean, sharp_std = exact_law("ddim", lambda: AutoGuidance(good, weak, 1.0), p, grid)
    expected = guided_ode_std(p, grid[0], STD, 2 * STD, 1.0, p.prior_std)
    assert expected == pytest.approx(0.15, rel=1e-3)
    assert -0.05 < model_std.mean().item() / STD - 1 < -0.035
    assert -0.085 < sharp_std.mean().item() / expected - 1 < -0.065
    assert (sharp_mean - mean[0]).abs().max().item() < 1e-3


def test_autoguidance_checks_its_inputs():
    good = GaussianMixtureDenoiser(MEANS, STD, VPSDE())
    with pytest.raises(ValueError, match="w must be >= 0"):
        AutoGuidance(good, good, -0.5)
    with pytest.raises(ValueError, match="same noise process"):
        AutoGuidance(good, GaussianMixtureDenoiser(MEANS, STD, DiscreteDDPM(100)), 1.0)


class ImageCountingNet(TinyConditionalNet):
    """Counts the images each forward pass evaluates."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x, t, labels=None):
        self.images += x.shape[0]
        return super().forward(x, t, labels)


@pytest.mark.parametrize(
    ("guidance", "autoguidance", "labelled", "per_call"),
    [(0.0, 0.0, True, 1), (2.0, 0.0, True, 2), (2.0, 0.0, False, 1), (0.0, 1.0, True, 2),
     (0.0, 1.0, False, 2), (2.0, 1.0, True, 4), (0.0, 0.0, False, 1)],
)
def test_network_evaluations_count_every_image_through_every_network(
    guidance, autoguidance, labelled, per_call
):
    """The NFE the pipeline reports: the images the networks actually evaluate, per image."""
    from diffusion_core.guidance import network_evaluations

    torch.manual_seed(0)
    p = DiscreteDDPM(100)
    good, weak = ImageCountingNet(), ImageCountingNet()
    den = Denoiser(good, p, "eps")
    if autoguidance:
        den = AutoGuidance(den, Denoiser(weak, p, "eps"), autoguidance)
    if guidance:
        den = ClassifierFreeGuidance(den, guidance)
    den = ClipX0(den)
    assert network_evaluations(den, labelled) == per_call
    labels = torch.tensor([0, 1, 2, 0]) if labelled else None
    result = generate(den, p, "ddim", shape=(1, 4, 4), seeds=range(4), labels=labels, steps=5)
    counted = (good.images + weak.images) / 4
    assert counted == result.nfe * per_call == 5 * per_call
