"""Sharded mixtures and fits (gk.mixture_partial / merge_partials / m.shard, gk.distributed,
randomized GaussianModel.fit) against the single-process results.

The multi-process cases run in ONE spawn of 3 gloo processes (importing torch in a fresh
process costs seconds): every case runs on the whole 3-rank group and on a 2-rank subgroup
{0, 1}; each rank saves its outputs and the tests below compare them with the single-process
ops here. Tolerances: float64 1e-10 (the merge reorders sums of exact terms: ~1e-15 expected);
float32 2e-5 relative, the conformance bound for float32 mixture outputs (logits carry
|x - mu|^2 / sigma^2 rounding).
"""
import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import gsa_kernels as gk
from gsa_kernels import fitting
from tests._helpers import random_mixture, rel_err

WORLD = 3
GROUPS = {"world3": (0, 1, 2), "pair": (0, 1)}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


# ----------------------------------------------------------------------------- cases


def _mixture_case(name, dtype):
    """(whole mixture, per-rank queries [B_i, 2, 3] builder, sigma builder) of a named case."""
    if name == "lowrank":  # K = 7: shards of 3/2/2 (3 ranks) and 4/3 (2 ranks); one -inf weight
        m = random_mixture(7, 6, 2, dtype=torch.float64, seed=1)
        lw = m.log_weights.clone()
        lw[2] = -math.inf
        m = gk.GaussianMixture(m.means, m.bases, m.eigvals, m.residual_var, lw)
    elif name == "empty_shard":  # K = 2 over 3 ranks: rank 2's shard is empty
        m = random_mixture(2, 6, 1, dtype=torch.float64, seed=2)
    else:  # "delta": the empirical mixture of 11 points, small sigma
        m = gk.GaussianMixture.from_points(torch.randn(11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    m = m.to(dtype=dtype)
    sigma_per_row = name != "delta"

    def queries(rank, sizes):
        g = torch.Generator().manual_seed(100 + rank)
        x = 2.0 * torch.randn(sizes[rank], 2, 3, dtype=torch.float64, generator=g)
        s = (0.05 + torch.rand(sizes[rank], dtype=torch.float64, generator=g)) if sigma_per_row else 0.05
        return x.to(dtype), (s.to(dtype) if sigma_per_row else s)

    return m, queries


MIXTURE_CASES = [(name, dtype) for name in ("lowrank", "empty_shard", "delta") for dtype in (torch.float64, torch.float32)]
SIZES = {"world3": [3, 0, 5], "pair": [4, 1]}  # different batch sizes, one rank without queries


def _fit_data(rank, dtype):
    """Rank 0: a tensor; rank 1: nothing ([0, D]); rank 2: a callable returning batches."""
    g = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))[0]
    lam = torch.arange(1, 13, dtype=torch.float64) ** -1.0
    X = (torch.randn(90, 12, dtype=torch.float64, generator=g) * lam.sqrt()) @ U.T + 5.0
    X = X.to(dtype)
    parts = {0: X[:50], 1: X[50:50], 2: X[50:]}
    if rank == 2:
        return lambda: iter(parts[2].split(13))
    return parts[rank]


FIT_PAIR_DATA = (0, 2)  # the pair's ranks hold rank 0's and rank 2's data
FIT_CASES = [("exact", None, None), ("exact", 3, None), ("exact", None, 0.9), ("randomized", 3, None)]


# ----------------------------------------------------------------------------- the workers


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    groups = {"world3": None, "pair": dist.new_group(list(GROUPS["pair"]))}
    out = {}
    for gname, members in GROUPS.items():
        if rank not in members:
            continue
        group, world = groups[gname], len(members)
        for name, dtype in MIXTURE_CASES:
            m, queries = _mixture_case(name, dtype)
            x, sigma = queries(rank, SIZES[gname])
            shard = m.shard(rank, world)
            key = (gname, name, str(dtype))
            out[key + ("denoise",)] = gk.distributed.mixture_denoise(x, sigma, shard, group=group)
            out[key + ("stats",)] = gk.distributed.last_call_stats()
            out[key + ("score",)] = gk.distributed.mixture_score(x, sigma, shard, group=group)
            out[key + ("logp",)] = gk.distributed.mixture_logp(x, sigma, shard, group=group)
        for dtype in (torch.float64, torch.float32):
            for method, r, energy in FIT_CASES:
                data = _fit_data(rank if gname == "world3" else FIT_PAIR_DATA[rank], dtype)
                g = gk.distributed.fit_gaussian(data, rank=r, energy=energy, group=group, method=method)
                out[(gname, "fit", method, r, energy, str(dtype))] = g.state_dict()
        # a bad argument on one rank: every rank raises, none waits forever
        m, queries = _mixture_case("lowrank", torch.float64)
        x, sigma = queries(rank, SIZES[gname])
        if rank == 1:
            x = x.reshape(x.shape[0], 6)[:, :5]
        try:
            gk.distributed.mixture_denoise(x, sigma, m.shard(rank, world), group=group)
            out[(gname, "error")] = None
        except (ValueError, RuntimeError) as e:
            out[(gname, "error")] = type(e).__name__
        try:
            gk.distributed.fit_gaussian(iter([torch.randn(5, 12)]), rank=2, group=group, method="randomized")
            out[(gname, "fit_error")] = None
        except (ValueError, RuntimeError) as e:
            out[(gname, "fit_error")] = type(e).__name__
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=300):
                pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return {r: torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)}


# ----------------------------------------------------------------------------- multi-process tests


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.numel():
        assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)


@pytest.mark.parametrize("gname", list(GROUPS))
@pytest.mark.parametrize("name,dtype", MIXTURE_CASES)
def test_sharded_mixture_matches_single_process(runs, gname, name, dtype):
    m, queries = _mixture_case(name, dtype)
    for rank in GROUPS[gname]:
        x, sigma = queries(rank, SIZES[gname])
        key = (gname, name, str(dtype))
        _close(runs[rank][key + ("denoise",)], gk.mixture_denoise(x, sigma, m), dtype)
        _close(runs[rank][key + ("score",)], gk.mixture_score(x, sigma, m), dtype)
        _close(runs[rank][key + ("logp",)], gk.mixture_logp(x, sigma, m), dtype)


@pytest.mark.parametrize("gname", list(GROUPS))
def test_sharded_mixture_counts_bytes(runs, gname):
    world, D = len(GROUPS[gname]), 6
    sizes = SIZES[gname]
    for rank in GROUPS[gname]:
        st = runs[rank][(gname, "lowrank", "torch.float64", "stats")]
        assert st["world_size"] == world and st["rows"] == sizes[rank] and st["rows_total"] == sum(sizes)
        # header (4 int64) + padded queries (max B rows of D + 1) to each other rank, then the
        # float64 states of the other ranks' rows (D + 4 each: M, S, ok, M's low part, W) to their owners
        sent = 8 * 4 * (world - 1) + 8 * max(sizes) * (D + 1) * (world - 1) + 8 * (D + 4) * (sum(sizes) - sizes[rank])
        assert st["bytes_sent"] == sent and st["collectives"] == 3


def _fit_reference(gname, dtype, method, r, energy):
    ranks = GROUPS[gname] if gname == "world3" else FIT_PAIR_DATA
    parts = []
    for rank in ranks:
        d = _fit_data(rank, dtype)
        parts.append(torch.cat(list(d())) if callable(d) else d)
    X = torch.cat(parts)
    if method == "randomized":
        return fitting.fit_randomized(X, r)
    return gk.GaussianModel.fit(X, rank=r, energy=energy, method=method)


@pytest.mark.parametrize("gname", list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method,r,energy", FIT_CASES)
def test_distributed_fit_matches_single_process(runs, gname, dtype, method, r, energy):
    want = _fit_reference(gname, dtype, method, r, energy)
    got = [runs[rank][(gname, "fit", method, r, energy, str(dtype))] for rank in GROUPS[gname]]
    for sd in got:  # the same model on every rank, bit for bit
        for k in sd:
            assert torch.equal(sd[k], got[0][k])
    sd = got[0]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert sd["basis"].shape == want.basis.shape and sd["basis"].dtype == want.basis.dtype
    _close(sd["mean"], want.mean, dtype)
    _close(sd["eigvals"], want.eigvals, dtype)
    assert abs(sd["residual_var"].item() - want.residual_var) <= tol * max(want.residual_var, 1e-3)
    # eigenvectors up to sign: the projections agree
    P = lambda U: U.double() @ U.double().T
    assert rel_err(P(sd["basis"]), P(want.basis)) <= (1e-8 if dtype == torch.float64 else 1e-4)


def test_distributed_errors_raise_on_every_rank(runs):
    for gname, members in GROUPS.items():
        kinds = {rank: runs[rank][(gname, "error")] for rank in members}
        assert kinds[1] == "ValueError" and all(kinds[r] == "RuntimeError" for r in members if r != 1)
        assert all(runs[rank][(gname, "fit_error")] == "ValueError" for rank in members)


# ----------------------------------------------------------------------------- in-process: partials


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 9])
def test_merge_partials_of_shards_is_the_whole_mixture(dtype, count):
    m = random_mixture(7, 6, 2, dtype=dtype, seed=4)
    x = 2 * torch.randn(5, 2, 3, dtype=dtype)
    sigma = 0.1 + torch.rand(5, dtype=dtype)
    parts = [gk.mixture_partial(x, sigma, m.shard(i, count)) for i in range(count)]
    assert sum(m.shard(i, count).num_components for i in range(count)) == 7
    for order in (parts, parts[::-1], parts[1:] + parts[:1]):
        p = gk.merge_partials(order)
        _close(p.denoised(), gk.mixture_denoise(x, sigma, m), dtype)
        _close(p.logp(), gk.mixture_logp(x, sigma, m), dtype)


def test_merge_partials_any_split_and_grouping():
    """Shards of a permuted mixture (any split of the components), merged in any grouping."""
    m = random_mixture(8, 4, 1, seed=5)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    permuted = gk.GaussianMixture(m.means[perm], m.bases[perm], m.eigvals[perm], m.residual_var[perm], m.log_weights[perm])
    x, sigma = torch.randn(6, 4, dtype=torch.float64), 0.3
    parts = [gk.mixture_partial(x, sigma, permuted.shard(i, 3)) for i in range(3)]
    p = gk.merge_partials([parts[2], gk.merge_partials(parts[:2])])
    _close(p.denoised(), gk.mixture_denoise(x, sigma, m), torch.float64)
    _close(p.logp(), gk.mixture_logp(x, sigma, m), torch.float64)


def test_partial_of_a_shard_is_its_posterior_and_shard_keeps_weights():
    m = random_mixture(5, 4, 2, seed=6)
    s = m.shard(1, 2)
    assert s.num_components == 2 and torch.equal(s.log_weights, m.log_weights[3:])  # not renormalised
    assert m.shard(0, 2).num_components == 3 and m.shard(5, 6).num_components == 0
    x = torch.randn(3, 4, dtype=torch.float64)
    p = gk.mixture_partial(x, 0.5, s)
    _close(p.logp(), gk.mixture_logp(x, 0.5, s), torch.float64)
    _close(p.denoised(), gk.mixture_denoise(x, 0.5, s), torch.float64)


def test_empty_and_weightless_partials():
    m = random_mixture(3, 4, 1, seed=7)
    x = torch.randn(2, 4, dtype=torch.float64)
    empty = gk.mixture_partial(x, 0.5, m.shard(3, 4))
    assert torch.equal(empty.logp(), torch.full((2,), -math.inf, dtype=torch.float64))
    with pytest.raises(ValueError, match="no component"):
        empty.denoised()
    weightless = gk.GaussianMixture(m.means, m.bases, m.eigvals, m.residual_var, torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64))
    only_first = gk.mixture_partial(x, 0.5, weightless.shard(1, 3))  # its one component has weight 0
    assert torch.isneginf(only_first.logp()).all() and not only_first.weighted.isnan().any()
    p = gk.merge_partials([empty, only_first, gk.mixture_partial(x, 0.5, weightless.shard(0, 3)), empty])
    for t in (p.max_logit, p.sum_exp, p.weighted):
        assert not t.isnan().any()
    ref = gk.GaussianMixture(m.means[:1], m.bases[:1], m.eigvals[:1], m.residual_var[:1], torch.zeros(1, dtype=torch.float64))
    _close(p.denoised(), gk.mixture_denoise(x, 0.5, ref), torch.float64)
    all_empty = gk.merge_partials([empty, empty])
    assert torch.isneginf(all_empty.logp()).all() and not all_empty.weighted.isnan().any()
    with pytest.raises(ValueError, match="no components"):
        gk.mixture_denoise(x, 0.5, m.shard(3, 4))


def test_partial_argument_errors():
    m = random_mixture(3, 4, 1, seed=9)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="features"):
        gk.mixture_partial(torch.randn(2, 5), 0.5, m)
    with pytest.raises(TypeError, match="GaussianMixture"):
        gk.mixture_partial(x, 0.5, "m")
    with pytest.raises(ValueError, match="sigma"):
        gk.mixture_partial(x, -1.0, m.shard(2, 4))
    with pytest.raises(ValueError, match="merge_partials"):
        gk.merge_partials([])
    with pytest.raises(ValueError, match="rows"):
        gk.merge_partials([gk.mixture_partial(x, 0.5, m), gk.mixture_partial(x[:1], 0.5, m)])
    with pytest.raises(ValueError, match="index"):
        m.shard(2, 2)
    with pytest.raises(TypeError, match="count"):
        m.shard(0, 2.0)


# ----------------------------------------------------------------------------- randomized fit


def _spectrum_data(N, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=g))[0]
    lam = torch.arange(1, D + 1, dtype=torch.float64) ** -1.0
    return ((torch.randn(N, D, dtype=torch.float64, generator=g) * lam.sqrt()) @ U.T + 3.0).to(dtype)


def test_randomized_fit_within_one_percent_of_exact():
    X = _spectrum_data(1500, 200)
    exact = gk.GaussianModel.fit(X, rank=16, method="exact")
    batches = list(X.split(256))
    for data in (X, batches, lambda: iter(batches)):
        g = gk.GaussianModel.fit(data, rank=16, method="randomized")
        assert ((g.eigvals - exact.eigvals).abs() / exact.eigvals).max() < 0.01
        assert abs(g.residual_var / exact.residual_var - 1) < 0.01
        assert rel_err(g.mean, exact.mean) < 1e-12
        assert rel_err(g.basis.T @ g.basis, torch.eye(16, dtype=torch.float64)) < 1e-10


def test_fit_method_auto_and_data_kinds(monkeypatch):
    X = _spectrum_data(300, 40, dtype=torch.float32)
    exact = gk.GaussianModel.fit(X, rank=5)
    gen = gk.GaussianModel.fit((b for b in X.split(64)), rank=5, method="auto")  # one pass: exact
    _close(gen.eigvals, exact.eigvals, torch.float32)
    one_pass = gk.GaussianModel.fit((b for b in X.split(64)), rank=5, method="randomized")  # fitting.fit_one_pass
    assert ((one_pass.eigvals - exact.eigvals).abs() / exact.eigvals).max() < 0.01
    with pytest.raises(ValueError, match="method"):
        gk.GaussianModel.fit(X, rank=5, method="svd")
    monkeypatch.setattr(fitting, "EXACT_FIT_BUDGET_BYTES", 8 * 39 * 39)  # D = 40 is now "large"
    g = gk.GaussianModel.fit(X, rank=5)
    assert g.dtype == torch.float32 and ((g.eigvals - exact.eigvals).abs() / exact.eigvals).max() < 0.01
    with pytest.raises(ValueError, match="budget"):
        gk.GaussianModel.fit(X)
    with pytest.raises(ValueError, match="changed between passes"):
        calls = iter(range(10))
        gk.GaussianModel.fit(lambda: iter(X[: 300 - next(calls)].split(64)), rank=5, method="randomized")


def test_readme_torchrun_example_runs():
    """The README's torchrun command, as written (2 gloo ranks; the example checks its answer)."""
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = re.search(r"^\s*(torchrun --nproc-per-node 2 examples/sharded_empirical_score.py)\s*$", (root / "README.md").read_text(), re.M)
    assert cmd, "README lost the torchrun command"
    # --standalone: a free rendezvous port (other jobs on this machine may hold the default one)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + cmd.group(1).split()[1:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("score relative error vs one process") == 2
