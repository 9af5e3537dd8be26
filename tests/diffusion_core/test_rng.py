"""Per-image counter-based streams: reproducible per seed, independent of the batch, standard
normal, and a fixed number of batched draws per sampler step whatever the batch size."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffusion_core.analytic import GaussianDenoiser
from diffusion_core.processes import make_process
from diffusion_core.rng import StackedRNG, mix64
from diffusion_core.samplers import generate


def test_image_i_depends_only_on_its_seed_and_the_draw_number() -> None:
    batch = StackedRNG([5, 6, 7])
    alone = StackedRNG([6])
    for _ in range(3):
        a, b = batch.randn((2, 3)), alone.randn((2, 3))
        torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)
    assert not torch.equal(batch.randn((4,))[0], batch.randn((4,))[0])  # draws differ
    assert not torch.equal(StackedRNG([1]).randn((8,)), StackedRNG([2]).randn((8,)))


def test_normals_and_uniforms_have_the_right_law() -> None:
    z = StackedRNG(range(500)).randn((200,)).flatten().double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    u = StackedRNG(range(500)).rand((200,)).flatten().double().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3 and u.min() > 0 and u.max() < 1
    # neighbouring seeds, elements and draws are uncorrelated
    rng = StackedRNG(range(2000))
    d1, d2 = rng.randn((32,)), rng.randn((32,))
    for a, b in ((d1[:-1], d1[1:]), (d1[:, :-1], d1[:, 1:]), (d1, d2)):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(r)) < 4 / math.sqrt(a.numel())


def test_mix64_is_the_splitmix64_finaliser() -> None:
    def reference(x: int) -> int:  # SplitMix64's output function on Python integers
        m = (1 << 64) - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    for value in (0, 1, 12345, (1 << 63) + 17, (1 << 64) - 1):
        signed = value - (1 << 64) if value >= 1 << 63 else value
        got = int(mix64(torch.tensor([signed], dtype=torch.int64))[0]) & ((1 << 64) - 1)
        assert got == reference(value)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sde", "pc", "dpmpp_2m_sde", "edm_heun"])
def test_random_draws_per_step_do_not_grow_with_the_batch(
    sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU proxy of the GPU cost: torch's generator-based draws are never called per
    image, and the batched draws per run are the same for 2 and 64 images."""
    process = make_process("vp")
    denoiser = GaussianDenoiser(torch.zeros(1, 2, 2), 0.5, process)
    calls = {"torch": 0}
    for name in ("randn", "rand", "normal"):
        original = getattr(torch, name)

        def counting(*args, _original=original, **kwargs):
            if kwargs.get("generator") is not None:
                calls["torch"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    settings = {"eta": 1.0} if sampler == "ddim" else {}
    if sampler == "edm_heun":
        settings = {"s_churn": 10.0}
    draws = {}
    for batch in (2, 64):
        seen = []
        original_words = StackedRNG._words

        def counted(self, shape, _seen=seen, _original=original_words):
            _seen.append(1)
            return _original(self, shape)

        monkeypatch.setattr(StackedRNG, "_words", counted)
        generate(denoiser, process, sampler, shape=(1, 2, 2), seeds=range(batch), steps=8,
                 **settings)
        draws[batch] = len(seen)
    assert calls["torch"] == 0
    assert draws[2] == draws[64] >= 2  # the prior draw and at least one per noisy step
