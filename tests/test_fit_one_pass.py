"""The randomized fit: one pass over a one-shot iterator (fitting.fit_one_pass), the exact small
problem for few rows, and constant data.

Accuracy of the one-pass fit against the exact fit (fitting.fit_one_pass's docstring; measured
with /tmp scripts on this test's data family at D = 4096, 1500 rows, rank 32, eigenvalues
10 j^-a over 400 directions plus isotropic noise 1e-4): max relative error of the top-32
eigenvalues 0.8 % (a = 1) and 0.12 % (a = 2); the 3-pass fit on the same data 0.3 % and 0.01 %.
"""
import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import fitting

F64 = torch.float64


def decaying(D, N, k, seed=0, decay=1.0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(D, k, generator=g))
    lam = 10 * torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (torch.randn(N, k, generator=g) * lam.sqrt()) @ V.T + 0.01 * torch.randn(N, D, generator=g) + offset


def exact_eigvals(X):
    Xc = (X - X.mean(0)).double()  # the nonzero eigenvalues of the scatter, from the N x N Gram matrix
    return torch.linalg.eigvalsh(Xc @ Xc.T).flip(0) / (X.shape[0] - 1)


def one_shot(X, rows=100, seen=None):
    for b in X.split(rows):
        if seen is not None:
            seen.append(b.shape[0])
        yield b


def test_one_pass_fit_of_a_generator_at_d4096():
    X = decaying(4096, 500, 150)
    seen = []
    g = gk.GaussianModel.fit(one_shot(X, seen=seen), rank=16, method="randomized")
    assert sum(seen) == 500  # read once, all of it
    ev = exact_eigvals(X)[:16]
    assert ((g.eigvals.double() - ev) / ev).abs().max() < 0.02
    torch.testing.assert_close(g.mean, X.mean(0), atol=1e-5, rtol=0)
    U = g.basis.double()
    torch.testing.assert_close(U.T @ U, torch.eye(16, dtype=F64), atol=1e-5, rtol=0)
    exact_resid = (ev.new_tensor(exact_eigvals(X)[16:].sum().item()) / (4096 - 16)).item()
    assert g.residual_var == pytest.approx(exact_resid, rel=0.02)


def test_one_pass_small_is_exact_and_reiterable_data_keep_three_passes():
    X = decaying(64, 300, 20, decay=2.0)
    ref = gk.GaussianModel.fit(X, rank=6, method="exact")
    g1 = fitting.fit_one_pass(one_shot(X, 30), 6, width=64)  # width D: nothing discarded
    torch.testing.assert_close(g1.eigvals, ref.eigvals, rtol=1e-4, atol=1e-6)
    calls = []

    def batches():
        calls.append(1)
        return X.split(30)

    g3 = gk.GaussianModel.fit(batches, rank=6, method="randomized")
    assert len(calls) == 3  # 300 rows > 4 x the sketch width 18: the 3-pass sketch
    torch.testing.assert_close(g3.eigvals, ref.eigvals, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="one-shot"):  # explicit power iterations need passes
        fitting.fit_randomized(one_shot(X), 6, power_iters=2)


@pytest.mark.parametrize("kind", ["tensor", "list", "one-shot"])
def test_few_rows_give_the_exact_fit(kind):
    # issue 25: with fewer rows than ~3 x rank the sketch was 7-23 % off
    X = decaying(400, 50, 60, seed=2)
    data = {"tensor": X, "list": list(X.split(16)), "one-shot": one_shot(X, 16)}[kind]
    g = gk.GaussianModel.fit(data, rank=32, method="randomized")
    ref = gk.GaussianModel.fit(X, rank=32, method="exact")
    torch.testing.assert_close(g.eigvals, ref.eigvals, rtol=1e-4, atol=1e-6)
    assert g.residual_var == pytest.approx(ref.residual_var, rel=1e-4, abs=1e-9)
    P, Pr = g.basis.double() @ g.basis.double().T, ref.basis.double() @ ref.basis.double().T
    assert (P - Pr).norm() < 1e-3 * 32 ** 0.5


@pytest.mark.parametrize("kind", ["tensor", "few rows", "one-shot", "one-shot few rows"])
def test_constant_data_fit_to_zeros(kind):
    # issue 25: "randomized fit: the sketch is not positive semidefinite (data changed between passes?)"
    n = 10 if "few" in kind else 1000
    X = torch.full((n, 300), 2.5)
    data = one_shot(X, 64) if "one-shot" in kind else X
    g = gk.GaussianModel.fit(data, rank=4, method="randomized")
    assert torch.equal(g.mean, torch.full((300,), 2.5))
    assert torch.equal(g.eigvals, torch.zeros(4)) and g.residual_var == 0.0
    U = g.basis.double()
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=F64), atol=1e-6, rtol=0)
    x = torch.randn(3, 300)
    torch.testing.assert_close(g.denoise(x, 0.5), torch.full_like(x, 2.5), atol=1e-5, rtol=0)


def test_one_pass_more_rank_than_rows():
    X = decaying(50, 5, 10)
    g = gk.GaussianModel.fit(one_shot(X, 2), rank=8, method="randomized")
    ref = gk.GaussianModel.fit(X, rank=8, method="exact")
    torch.testing.assert_close(g.eigvals, ref.eigvals, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g.basis.T @ g.basis, torch.eye(8), atol=1e-5, rtol=0)


def test_auto_over_the_budget_fits_a_generator_in_one_pass(monkeypatch):
    monkeypatch.setattr(fitting, "EXACT_FIT_BUDGET_BYTES", 8 * 30 * 30)  # D = 40 is now "large"
    X = decaying(40, 300, 20, decay=2.0)
    seen = []
    g = gk.GaussianModel.fit(one_shot(X, 64, seen), rank=5)  # auto peeks, then the one-pass fit reads on
    assert sum(seen) == 300
    ref = gk.GaussianModel.fit(X, rank=5, method="exact")
    assert ((g.eigvals - ref.eigvals).abs() / ref.eigvals).max() < 0.01
