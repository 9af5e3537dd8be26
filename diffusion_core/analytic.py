"""Exact denoisers for Gaussian data: ground truth for testing samplers, guidance and likelihoods.

For data ``x_0 ~ N(mu, s^2 I)`` the marginal is ``x_t ~ N(alpha mu, (alpha^2 s^2 + sigma^2) I)``
and the optimal (posterior-mean) predictors are

    E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)
    E[x_0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).

For a class-conditional mixture (one Gaussian per class) the unconditional predictor is the
posterior-responsibility average of the per-class ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.denoiser import DenoiserOutput, time_batch
from diffusion_core.processes import NoiseProcess, broadcast


class GaussianMixtureDenoiser:
    """Exact denoiser for ``p(x_0 | c) = N(means[c], std^2 I)``, ``p(c) = weights[c]``.

    Labels ``0..K-1`` select a component; the null label ``K`` (or ``labels=None``) gives the
    unconditional mixture.
    """

    def __init__(self, means: Tensor, std: float, process: NoiseProcess,
                 weights: Tensor | None = None):
        self.means = means.double()
        self.std = float(std)
        self.process = process
        k = means.shape[0]
        self.weights = (torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None
                        else weights.double() / weights.sum())
        self._k = k
        self.num_classes = k
        self.null_label = k

    def _marginal_var(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha = broadcast(self.process.alpha(t), x.double())
        sigma = broadcast(self.process.sigma(t), x.double())
        return alpha, sigma, alpha**2 * self.std**2 + sigma**2

    def log_prob(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``log p_t(x | c)`` (or the mixture's ``log p_t(x)`` for null labels), per sample."""
        x = x.double()
        t = time_batch(t, x)
        alpha, _, var = self._marginal_var(x, t)
        d = x[0].numel()
        var_b = var.reshape(-1)
        means = self.means.to(x.device)
        # (B, K) component log-densities
        diff = x.unsqueeze(1) - alpha.unsqueeze(1) * means.unsqueeze(0)
        sq = diff.flatten(2).pow(2).sum(-1)
        comp = -0.5 * sq / var_b[:, None] - 0.5 * d * torch.log(2 * math.pi * var_b)[:, None]
        mix = torch.logsumexp(comp + torch.log(self.weights.to(x.device)), dim=1)
        if labels is None:
            return mix
        lab = labels.to(x.device).clamp(max=self._k - 1)
        cond = comp.gather(1, lab[:, None]).squeeze(1)
        return torch.where(labels.to(x.device) == self._k, mix, cond)

    def __call__(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> DenoiserOutput:
        xd = x.double()
        t = time_batch(t, x)
        alpha, sigma, var = self._marginal_var(xd, t)
        means = self.means.to(x.device)
        if labels is None:
            labels = torch.full((x.shape[0],), self._k, device=x.device, dtype=torch.long)
        # responsibilities r_k(x) of each component given x_t
        diff = xd.unsqueeze(1) - alpha.unsqueeze(1) * means.unsqueeze(0)
        sq = diff.flatten(2).pow(2).sum(-1)
        logits = -0.5 * sq / var.reshape(-1, 1) + torch.log(self.weights.to(x.device))
        resp = torch.softmax(logits, dim=1)
        onehot = torch.nn.functional.one_hot(
            labels.clamp(max=self._k - 1), self._k).double()
        is_null = (labels == self._k)[:, None]
        resp = torch.where(is_null, resp, onehot)
        mu = torch.einsum("bk,k...->b...", resp, means)
        # E[eps | x_t] = sigma (x_t - alpha E[mu | x_t]) / var  (shared covariance)
        eps = sigma * (xd - alpha * mu) / var
        x0 = (xd - sigma * eps) / alpha
        return DenoiserOutput(eps.to(x.dtype), x0.to(x.dtype))


class GaussianDenoiser(GaussianMixtureDenoiser):
    """Exact denoiser for ``x_0 ~ N(mean, std^2 I)`` (a one-component mixture)."""

    def __init__(self, mean: Tensor, std: float, process: NoiseProcess):
        super().__init__(mean.unsqueeze(0), std, process)
        self.num_classes = 0
        self.null_label = None

    def __call__(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> DenoiserOutput:
        return super().__call__(x, t, None)

    def log_prob(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        return super().log_prob(x, t, None)
