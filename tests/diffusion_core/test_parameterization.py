"""Conversions between eps, x0, v and the score are exact inverses of each other."""

import pytest
import torch

from diffusion_core import parameterization as P


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    # include alpha^2 + sigma^2 != 1 (VE, sub-VP)
    alpha = torch.rand(16, 1, 1, 1, generator=g, dtype=torch.float64) + 0.05
    sigma = 3 * torch.rand(16, 1, 1, 1, generator=g, dtype=torch.float64) + 0.05
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "flow"])
def test_prediction_roundtrip(case, kind):
    x0, eps, alpha, sigma, x = case
    target = P.training_target(kind, x0, eps, alpha, sigma)
    eps_hat, x0_hat = P.eps_x0_from_prediction(kind, target, x, alpha, sigma)
    assert torch.allclose(eps_hat, eps, atol=1e-10)
    assert torch.allclose(x0_hat, x0, atol=1e-10)


def test_pairwise_inverses(case):
    x0, eps, alpha, sigma, x = case
    assert torch.allclose(P.x0_from_eps(x, P.eps_from_x0(x, x0, alpha, sigma), alpha, sigma), x0)
    v = P.v_from_eps_x0(eps, x0, alpha, sigma)
    e2, x2 = P.eps_x0_from_v(x, v, alpha, sigma)
    assert torch.allclose(e2, eps) and torch.allclose(x2, x0)
    assert torch.allclose(-sigma * P.score_from_eps(eps, sigma), eps)


def test_score_of_gaussian_marginal(case):
    """For x_t ~ N(alpha x0, sigma^2) the score is -(x - alpha x0)/sigma^2 = -eps/sigma."""
    x0, eps, alpha, sigma, x = case
    assert torch.allclose(P.score_from_eps(eps, sigma), -(x - alpha * x0) / sigma**2)


def test_unknown_kind():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown prediction"):
        P.training_target("score", z, z, z + 1, z + 1)


def test_flow_is_the_velocity_of_the_linear_path_and_finite_at_pure_noise():
    """On x_t = (1 - t) x0 + t eps the flow u = eps - x0 is dx_t/dt, and x0 = x_t - t u,
    eps = x_t + (1 - t) u hold for every t in [0, 1], including t = 1 where alpha = 0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)[:, None]
    x = (1 - t) * x0 + t * eps
    u = P.training_target("flow", x0, eps, 1 - t, t)
    h = 1e-6
    assert torch.allclose(u, ((1 - t + h) * x0 + (t - h) * eps - x) / -h, atol=1e-8)
    eps_hat, x0_hat = P.eps_x0_from_prediction("flow", u, x, 1 - t, t)
    assert torch.allclose(x0_hat, x - t * u) and torch.allclose(eps_hat, x + (1 - t) * u)
    assert torch.allclose(x0_hat, x0, atol=1e-12) and torch.allclose(eps_hat, eps, atol=1e-12)
