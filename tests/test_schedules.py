import math

import pytest
import torch

from gsa_kernels import schedules


def test_karras_matches_edm_formula():
    # EDM eq. 5 written out independently: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    s = schedules.karras(n, smin, smax, rho)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    for i in range(n):
        want = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert math.isclose(float(s[i]), want, rel_tol=1e-12)
    assert float(s[0]) == pytest.approx(smax, rel=1e-12) and float(s[n - 1]) == pytest.approx(smin, rel=1e-12)
    assert float(s[-1]) == 0.0
    assert (s[1:] < s[:-1]).all()


def test_karras_single_step_and_bad_args():
    assert schedules.karras(1, 0.5, 10.0).tolist() == pytest.approx([10.0, 0.0], rel=1e-14)
    for bad in (dict(num_steps=0), dict(num_steps=2.5), dict(num_steps=4, sigma_min=0.0),
                dict(num_steps=4, sigma_min=5.0, sigma_max=1.0), dict(num_steps=4, rho=0.0)):
        with pytest.raises(ValueError):
            schedules.karras(**{"num_steps": 4, **bad})


SIGMAS = [0.0, 0.002, 0.1, 1.0, 14.6, 80.0]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_vp_round_trip_and_states(as_tensor):
    for sigma in SIGMAS:
        s = torch.tensor(sigma, dtype=torch.float64) if as_tensor else sigma
        abar = schedules.to_alphas_cumprod(s)
        scale, sigma_back = schedules.from_alphas_cumprod(abar)
        # abar = 1/(1+sigma^2) stores 1 - abar ~ sigma^2 with absolute error ~1e-16, so sigma
        # comes back with relative error ~1e-16 / sigma^2 (2.5e-11 at 0.002): the VP view's limit
        assert float(sigma_back) == pytest.approx(sigma, rel=1e-16 / max(sigma, 1e-3) ** 2 + 1e-12, abs=1e-15)
        assert float(scale) == pytest.approx(1 / math.sqrt(1 + sigma**2), rel=1e-12)
    # the (scale, sigma) pair reproduces the DDPM state sqrt(abar) x0 + sqrt(1 - abar) eps
    abar = torch.tensor([0.9999, 0.5, 0.01, 1e-4], dtype=torch.float64)
    scale, sigma = schedules.from_alphas_cumprod(abar)
    x0, eps = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    vp = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps
    torch.testing.assert_close(scale[:, None] * (x0 + sigma[:, None] * eps), vp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedules.to_alphas_cumprod(sigma), abar, rtol=1e-12, atol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flow_round_trip_and_states(as_tensor):
    for sigma in SIGMAS:
        s = torch.tensor(sigma, dtype=torch.float64) if as_tensor else sigma
        t = schedules.to_flow_t(s)
        scale, sigma_back = schedules.from_flow_t(t)
        assert float(sigma_back) == pytest.approx(sigma, rel=1e-12, abs=1e-15)
        assert float(scale) == pytest.approx(1 / (1 + sigma), rel=1e-12)
    assert schedules.to_flow_t(math.inf) == 1.0
    t = torch.tensor([0.0, 0.25, 0.5, 0.999], dtype=torch.float64)
    scale, sigma = schedules.from_flow_t(t)
    x0, eps = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    rf = (1 - t)[:, None] * x0 + t[:, None] * eps
    torch.testing.assert_close(scale[:, None] * (x0 + sigma[:, None] * eps), rf, rtol=1e-12, atol=1e-12)


def test_conversions_reject_out_of_range():
    for f, v in ((schedules.from_alphas_cumprod, 0.0), (schedules.from_alphas_cumprod, 1.5),
                 (schedules.from_flow_t, 1.0), (schedules.from_flow_t, -0.1),
                 (schedules.to_alphas_cumprod, -1.0), (schedules.to_flow_t, float("nan"))):
        with pytest.raises(ValueError):
            f(v)
        with pytest.raises(ValueError):
            f(torch.tensor([0.5, v], dtype=torch.float64))
    with pytest.raises(TypeError):
        schedules.to_flow_t("1.0")


def test_truncate_and_skip_index():
    s = schedules.karras(10)
    torch.testing.assert_close(schedules.truncate(s, float(s[3])), s[3:])
    t = schedules.truncate(s, 5.0)
    assert float(t[0]) == 5.0 and (t[1:] < 5.0).all() and t.numel() == 1 + int((s < 5.0).sum())
    assert schedules.truncate(s, 0.0).tolist() == [0.0]
    with pytest.raises(ValueError):
        schedules.truncate(s, 100.0)
    assert [schedules.skip_index(10, f) for f in (0.0, 0.1, 0.24, 0.25, 0.4)] == [0, 1, 2, 3, 4]
    assert schedules.skip_index(25, 0.3) == 8 and schedules.skip_index(18, 0.25) == 5  # half up
    assert schedules.skip_index(2, 0.9) == 1  # always leaves one step
    with pytest.raises(ValueError):
        schedules.skip_index(10, 1.0)
