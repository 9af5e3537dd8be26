"""EMA math on a scalar parameter, warm-up, buffers and state round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_core.ema import EMA, power_ema_gamma, power_ema_std, unwrap_model


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0))


def _set(model: Scalar, value: float) -> None:
    with torch.no_grad():
        model.w.fill_(value)


def test_constant_decay_matches_the_closed_form():
    # theta_ema_n = d^n theta_0 + (1 - d) sum_k d^(n-1-k) theta_k
    model, d = Scalar(1.0), 0.9
    ema = EMA(model, decay=d, warmup=False)
    values = [2.0, -1.0, 4.0, 0.5]
    for v in values:
        _set(model, v)
        ema.update(model)
    n = len(values)
    expected = d**n * 1.0 + (1 - d) * sum(d ** (n - 1 - k) * v for k, v in enumerate(values))
    assert ema.module.w.item() == pytest.approx(expected, rel=1e-12)
    assert model.w.item() == 0.5  # the trained model is untouched


def test_warmup_decay_schedule():
    model = Scalar(0.0)
    ema = EMA(model, decay=0.2, warmup=True)
    decays = []
    for _ in range(4):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([1 / 10, 2 / 11, 0.2, 0.2])  # min(0.2, (1+k)/(10+k))


def test_first_warmup_update_mostly_takes_the_new_weights():
    model = Scalar(0.0)
    ema = EMA(model, decay=0.999, warmup=True)
    _set(model, 10.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(0.1 * 0.0 + 0.9 * 10.0)


def test_buffers_are_copied_not_averaged():
    model = Scalar(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    model.count.fill_(7)
    ema.update(model)
    assert ema.module.count.item() == 7


def test_state_dict_round_trip_continues_exactly():
    model = Scalar(1.0)
    a = EMA(model, decay=0.99)
    for v in (3.0, 5.0):
        _set(model, v)
        a.update(model)
    b = EMA(Scalar(-100.0), decay=0.99)
    b.load_state_dict(a.state_dict())
    for v in (7.0, -2.0):
        _set(model, v)
        a.update(model)
        b.update(model)
    assert b.num_updates == a.num_updates == 4
    assert torch.equal(a.module.w, b.module.w)


def test_copy_to_and_module_have_no_gradients():
    model = Scalar(2.0)
    ema = EMA(model, decay=0.9)
    assert not ema.module.w.requires_grad and not ema.module.training
    target = Scalar(0.0)
    ema.copy_to(target)
    assert target.w.item() == 2.0


def test_unwrap_model_sees_through_compile_wrappers():
    model = Scalar(1.0)
    assert unwrap_model(model) is model
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    ema = EMA(compiled, decay=0.5, warmup=False)
    assert set(ema.module.state_dict()) == {"w", "count"}


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        EMA(Scalar(0.0), decay=1.0)


# ------------------------------------------------------------- power-function EMA (EDM2)


@pytest.mark.parametrize("std, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_power_ema_gamma_matches_edm2(std, gamma):
    # EDM2 (Karras et al. 2024) quotes sigma_rel 0.05 ~ gamma 16.97 and 0.10 ~ gamma 6.94
    g = power_ema_gamma(std)
    assert g == pytest.approx(gamma, abs=0.01)
    assert power_ema_std(g) == pytest.approx(std, rel=1e-10)


def test_power_ema_std_outside_the_reachable_range_is_refused():
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="power EMA std"):
            power_ema_gamma(bad)


def test_power_ema_average_has_the_closed_form_profile():
    # after K updates the weights after update k (1-based) count
    # (k^(g+1) - (k-1)^(g+1)) / K^(g+1): a telescoping product of d_k = (1 - 1/k)^(g+1)
    model = Scalar(123.0)  # the initial value gets weight 0 (d_1 = 0)
    ema = EMA(model, std=0.1)
    g = ema.gamma
    values = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for v in values:
        _set(model, float(v))
        ema.update(model)
    k = torch.arange(1, 41, dtype=torch.float64)
    w = (k ** (g + 1) - (k - 1) ** (g + 1)) / 40 ** (g + 1)
    assert w.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert ema.module.w.item() == pytest.approx(float((w * values).sum()), rel=1e-10)


@pytest.mark.parametrize("std", [0.05, 0.1, 0.2])
def test_power_ema_profile_width_is_std_of_the_run_length(std):
    # the profile's standard deviation, as a fraction of the steps so far, is std at any length
    g = power_ema_gamma(std)
    for steps in (300, 3000):
        k = torch.arange(1, steps + 1, dtype=torch.float64)
        w = (k ** (g + 1) - (k - 1) ** (g + 1)) / steps ** (g + 1)
        mean = (w * k).sum()
        width = ((w * (k - mean) ** 2).sum()).sqrt() / steps
        assert width.item() == pytest.approx(std, rel=0.03)


def test_power_ema_state_round_trip_continues_the_profile():
    model = Scalar(0.0)
    a, b = EMA(model, std=0.05), EMA(model, std=0.05)
    for v in (1.0, 2.0, 3.0):
        _set(model, v)
        a.update(model)
    b.load_state_dict(a.state_dict())
    assert b.current_decay() == a.current_decay() == pytest.approx((3 / 4) ** (a.gamma + 1))
    assert a.state_dict()["std"] == 0.05
