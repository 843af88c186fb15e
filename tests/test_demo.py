"""The MNIST demo: Frechet metric on known cases, the committed weights, and the demo / explain
commands end to end in their --quick settings (outputs exist and are finite)."""
import csv
import math

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend", reason="the demo extra (mlxtend) is not installed")

import gsa_kernels as gk  # noqa: E402
from gsa_kernels.tools.demo import demo, explain  # noqa: E402
from gsa_kernels.tools.demo.classifier import load_classifier  # noqa: E402
from gsa_kernels.tools.demo.data import mnist_split  # noqa: E402
from gsa_kernels.tools.demo.metrics import frechet_distance, frechet_distance_from_stats  # noqa: E402
from gsa_kernels.tools.demo.net import load_denoiser  # noqa: E402


def _scipy_frechet(a, b):
    """The FID code's formula: scipy.linalg.sqrtm of the (non-symmetric) product S_a S_b."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))


# ----------------------------------------------------------------------------- metrics


def _correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


def test_frechet_identical_sets_is_zero():
    a = _correlated(300, 16, 0)
    # float64 eigendecompositions of O(10)-sized matrices: rounding ~1e-12 relative to the traces
    assert abs(frechet_distance(a, a)) < 1e-8 * a.var(0).sum().item()


@pytest.mark.parametrize("d", [1, 16, 61])
def test_frechet_shifted_set_is_squared_shift(d):
    a = _correlated(400, d, 1)
    shift = torch.linspace(-2, 3, d, dtype=torch.float64)
    # same covariance: the trace term vanishes, FD = |shift|^2 up to float64 rounding
    assert frechet_distance(a, a + shift) == pytest.approx(shift.pow(2).sum().item(), rel=1e-8, abs=1e-8)


def test_frechet_isotropic_gaussians_closed_form():
    d, std_a, std_b = 20, 0.5, 2.0
    mu = torch.zeros(d)
    fd = frechet_distance_from_stats(mu, std_a ** 2 * torch.eye(d), mu + 1, std_b ** 2 * torch.eye(d))
    assert fd == pytest.approx(d + d * (std_a - std_b) ** 2, rel=1e-10)  # |1|^2 d + d (std_a - std_b)^2


@pytest.mark.parametrize("n_a,n_b,d", [(500, 300, 8), (200, 250, 40)])
def test_frechet_matches_scipy_sqrtm_formula(n_a, n_b, d):
    a = _correlated(n_a, d, 2)
    b = 1.5 * _correlated(n_b, d, 3) + 0.3
    # two float64 routes to tr (S_a S_b)^(1/2): agree to ~1e-9 relative on well-conditioned covariances
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-7)


def test_frechet_rejects_single_sample():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# ----------------------------------------------------------------------------- committed weights


@pytest.fixture(scope="module")
def heldout():
    return mnist_split("heldout")


def test_committed_denoiser_loads_and_denoises(heldout):
    net = load_denoiser()
    assert sum(p.numel() for p in net.parameters()) * 4 < 5e6  # < 5 MB of float32 weights
    x0 = heldout[0][:200].reshape(200, -1)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        near_identity = net(x0 + 0.002 * eps, 0.002)
        assert near_identity.shape == x0.shape and torch.isfinite(near_identity).all()
        # at sigma = 0.002, c_skip ~ 1 and c_out ~ 0.002: the output stays within ~1e-2 of the input
        assert (near_identity - x0).abs().max() < 0.05
        # a trained network beats the best linear (Gaussian) denoiser on held-out digits at sigma = 0.5
        gaussian = gk.GaussianModel.fit(mnist_split("train")[0])
        x = x0 + 0.5 * eps
        err_net = (net(x, torch.full((200,), 0.5)) - x0).pow(2).mean()
        err_gauss = (gaussian.denoise(x, 0.5) - x0).pow(2).mean()
        assert err_net < 0.8 * err_gauss


def test_committed_classifier_accuracy(heldout):
    clf = load_classifier()
    x, y = heldout
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
        assert clf.features(x[:3]).shape == (3, 128)
    assert acc > 0.95


# ----------------------------------------------------------------------------- end to end


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _assert_png(path):
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and np.isfinite(img).all()
    return img


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert demo.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    rows = _read_csv(tmp_path / "demo_table.csv")
    nfe = {r["name"]: int(r["nfe"]) for r in rows}
    # heun:6:0.34 -> 6 Heun steps = 11 NFE; skipping round(0.34 * 6) = 2 steps leaves 4 (7 NFE), for the
    # teleport and both baselines alike; dpmpp_2m:5:0.2 -> one evaluation per step, 1 step skipped
    assert nfe == {"heun6_full": 11, "heun6_teleport2": 7, "heun6_fewer2": 7, "heun6_truncated2": 7,
                   "dpmpp_2m5_full": 5, "dpmpp_2m5_teleport1": 4, "dpmpp_2m5_fewer1": 4, "dpmpp_2m5_truncated1": 4,
                   "training_data": 0, "gaussian_samples": 0, "mixture_samples": 0}
    for r in rows:
        assert math.isfinite(float(r["fd_features"])) and math.isfinite(float(r["fd_pixels"]))
        assert float(r["fd_features"]) >= -1e-6
        img = _assert_png(tmp_path / f"samples_{r['name']}.png")
        assert img.shape[1] >= 660  # at least twice the 330-pixel grids of before
        full = r["variant"] == "full" or r["variant"] == "reference"
        assert (r["fd_features_vs_full_pct"] == "") == full
    # the teleport starts the network where the truncated baseline does, the fewer-steps one at sigma_max
    start = {r["name"]: float(r["sigma_start"]) for r in rows}
    assert start["heun6_teleport2"] == start["heun6_truncated2"] < start["heun6_fewer2"] == start["heun6_full"] == 80
    # every CSV column is explained, and the quality columns say which direction is better
    meaning = dict(line.split(": ", 1) for line in (tmp_path / "demo_table_columns.txt").read_text().splitlines())
    assert list(meaning) == list(rows[0])
    assert all("lower is better" in meaning[c] for c in ("fd_features", "fd_pixels", "fd_features_vs_full_pct"))
    _assert_png(tmp_path / "quality_vs_nfe.png")
    out = capsys.readouterr().out
    assert "LOWER IS BETTER" in out and "dFD" in out and "heun6" not in out  # readable labels, not ids
    assert "Heun, 6 steps: teleporting 2 steps saves 4 of 11 NFE" in out
    assert "s per NFE" in out
    assert out.startswith("SMOKE TEST (--quick): 48 samples") and "within the noise" in out
    sds = [float(r["fd_features_vs_full_sd"]) for r in rows if r["fd_features_vs_full_pct"] != ""]
    assert len(sds) == 6 and all(sd > 0 for sd in sds)  # every dFD carries its bootstrap spread
    assert sum("±" in line for line in out.splitlines()) >= 6


def test_demo_settings_and_run_specs():
    from gsa_kernels.tools.demo.cli import run_spec

    plan = demo.plan_settings([run_spec("heun:18:0.2,0.21,0.4"), run_spec("dpmpp_2m:10:0.01")])
    names = [p[0] for p in plan]
    # 0.2 and 0.21 both round to 4 steps (run once); a fraction rounding to 0 skips one step
    assert names == ["heun18_full", "heun18_teleport4", "heun18_fewer4", "heun18_truncated4", "heun18_teleport7",
                     "heun18_fewer7", "heun18_truncated7", "dpmpp_2m10_full", "dpmpp_2m10_teleport1",
                     "dpmpp_2m10_fewer1", "dpmpp_2m10_truncated1"]
    for _name, _, sampler, variant, k, steps, sigmas in plan:
        expected = gk.sampling.expected_nfe(sampler, gk.schedules.karras(steps - k))
        assert gk.sampling.expected_nfe(sampler, sigmas) == (expected if variant != "full" else
                                                             gk.sampling.expected_nfe(sampler, gk.schedules.karras(steps)))


def test_explain_quick_end_to_end(tmp_path):
    assert explain.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    rows = _read_csv(tmp_path / "explained_variance.csv")
    assert len(rows) == 4
    for r in rows:
        for m in ("gaussian", "mixture", "delta"):
            ev = float(r[f"ev_{m}"])
            assert math.isfinite(ev) and ev <= 1 + 1e-9  # a fraction explained never exceeds 1
    # at sigma = 0.002 the network is ~ the identity, and so are the Gaussian and the mixture
    assert float(rows[0]["ev_gaussian"]) > 0.99 and float(rows[0]["ev_mixture"]) > 0.99
    _assert_png(tmp_path / "explained_variance.png")


def test_explain_local_quick_end_to_end(tmp_path, capsys):
    assert explain.main(["--local", "--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    assert "SMOKE TEST" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "local_r2.csv")
    sigmas = gk.schedules.karras(3)[:-1].tolist()  # the quick schedule's sigmas are the calibration grid
    assert [float(r["sigma"]) for r in rows] == pytest.approx(sigmas, rel=1e-5)
    calib = _read_csv(tmp_path / "local_calibration.csv")
    assert len(calib) == 3 * 3 * 3  # sigmas x machines x patch sizes 1, 3, 5
    for r in rows:
        for mode in ("ls", "els", "bbels"):
            # the reported P is the calibration's best at that sigma
            cand = {int(c["patch_size"]): float(c["r2"]) for c in calib
                    if c["machine"] == mode and float(c["sigma"]) == pytest.approx(float(r["sigma"]), rel=1e-5)}
            assert int(r[f"P_{mode}"]) == max(cand, key=cand.get)
        for m in ("gaussian", "mixture", "delta", "ls", "els", "bbels"):
            assert math.isfinite(float(r[f"r2_{m}"])) and float(r[f"r2_{m}"]) <= 1 + 1e-9
    # at sigma = 0.002 the network is ~ the identity, and so are the Gaussian and ELS / BB-ELS at P = 1
    # (LS at P = 1 only has its 16 training digits' values at each pixel)
    assert all(float(rows[-1][f"r2_{m}"]) > 0.99 for m in ("gaussian", "els", "bbels"))
    case = _read_csv(tmp_path / "local_case_by_case.csv")
    assert len(case) == 4 and all(math.isfinite(float(v)) for r in case for k, v in r.items() if k != "path")
    _assert_png(tmp_path / "local_pairs.png")


# ----------------------------------------------------------------------------- class-conditional demo


def test_committed_conditional_denoiser_uses_its_labels(heldout):
    from safetensors import safe_open

    from gsa_kernels.tools.demo.data import ASSETS_DIR
    from gsa_kernels.tools.demo.net import CONDITIONAL_DENOISER_FILE
    from gsa_kernels.tools.demo.train import heldout_denoiser_loss

    net = load_denoiser(conditional=True)
    with safe_open(str(ASSETS_DIR / CONDITIONAL_DENOISER_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["command"].startswith("python -m gsa_kernels train-demo-model --conditional")
    x, y = heldout[0][:400], heldout[1][:400]
    noisy = x + 5.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # at sigma = 5 the class is not yet decided by the image: the label must help
        right = (net(noisy, 5.0, y) - x).pow(2).mean().item()
        wrong = (net(noisy, 5.0, (y + 1) % 10) - x).pow(2).mean().item()
    assert right < 0.92 * wrong, (right, wrong)  # measured 0.85 (the label helps, but modestly: docs/demo_results.md)
    assert heldout_denoiser_loss(net) == pytest.approx(float(meta["heldout_loss_ema"]), rel=1e-4)
    with pytest.raises(ValueError, match="class-conditional"):
        net(x[:2], 1.0)


def test_train_conditional_starts_from_the_unconditional_network(tmp_path):
    from safetensors import safe_open

    from gsa_kernels.tools.demo import train

    # one step at learning rate 0: the saved network is the one training starts from
    assert train.main(["--conditional", "--steps", "1", "--lr", "0", "--out-dir", str(tmp_path)]) == 0
    out = tmp_path / "mnist_edm_denoiser_conditional.safetensors"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["initialised_from"] == "mnist_edm_denoiser.safetensors" and meta["steps"] == "1"
    net, base = load_denoiser(out, conditional=True), load_denoiser()
    x = torch.randn(4, 784)
    with torch.no_grad():  # a zero class embedding: untrained, it is the unconditional network
        torch.testing.assert_close(net(x, 2.0, torch.tensor([0, 3, 5, 9])), base(x, 2.0), rtol=0, atol=0)


def test_demo_conditional_quick_end_to_end(tmp_path, capsys):
    assert demo.main(["--conditional", "--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    rows = _read_csv(tmp_path / "conditional_table.csv")
    # heun:4:0.25 -> 4 Heun steps = 7 NFE; one step skipped leaves 3 (5 NFE) for both teleports and fewer steps
    assert {r["name"]: int(r["nfe"]) for r in rows} == {
        "heun4_full": 7, "heun4_teleport1": 5, "heun4_teleport_global1": 5, "heun4_fewer1": 5,
        "training_data": 0, "class_gaussian_samples": 0, "global_gaussian_samples": 0}
    start = {r["name"]: float(r["sigma_start"]) for r in rows}
    assert start["heun4_teleport1"] == start["heun4_teleport_global1"] < start["heun4_fewer1"] == 80
    for r in rows:
        fds = [float(r["fd"]), float(r["fd_class_mean"])] + [float(r[f"fd_class_{c}"]) for c in range(10)]
        assert all(math.isfinite(v) and v >= -1e-6 for v in fds)
        assert 0 <= float(r["accuracy"]) <= 1
        _assert_png(tmp_path / f"conditional_samples_{r['name']}.png")
    acc = {r["name"]: float(r["accuracy"]) for r in rows}
    assert acc["training_data"] > 0.9  # the floor: the classifier on real digits with their labels
    out = capsys.readouterr().out
    assert "LOWER IS BETTER" in out and "HIGHER IS BETTER" in out and "teleport global" in out
    assert out.startswith("SMOKE TEST (--quick): 40 samples") and "FD all" in out and "±" in out


def test_quick_never_overrides_explicit_options_and_usage_errors(capsys):
    args = demo.parse_args(["--quick", "--num-samples", "64", "--runs", "heun:4:0.25"])
    assert args.num_samples == 64 and args.batch_size == 64 and args.runs == [("heun", 4, [0.25])]
    assert args.bootstrap == 20
    args = demo.parse_args(["--quick"])
    assert args.num_samples == 48 and args.bootstrap == 20
    args = demo.parse_args([])
    assert args.num_samples == 500 and args.batch_size == 500 and args.bootstrap == 100
    args = explain.parse_args(["--quick", "--num-samples", "10"])
    assert (args.num_samples, args.num_sigmas, args.splits) == (10, 4, ["heldout"])
    assert "SMOKE TEST" in capsys.readouterr().out
    for argv in (["--batch-size", "0"], ["--num-samples", "1"], ["--mixture-components", "0"], ["--threads", "-2"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
        assert "must be >=" in capsys.readouterr().err
    from gsa_kernels.tools.demo.cli import bench_parser

    with pytest.raises(SystemExit):
        bench_parser().parse_args(["--repeats", "0"])


def test_bootstrap_fd_is_paired_and_its_spread_is_honest():
    from gsa_kernels.tools.demo.metrics import bootstrap_fd

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 6, generator=g, dtype=torch.float64)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64) + 0.3
    boot = bootstrap_fd({"a": a, "same": a.clone(), "b": a + 0.01}, ref, 40, seed=1)
    assert torch.equal(boot["a"], boot["same"])  # one index draw per resample, used for every set
    # paired: a tiny shift of every sample moves each resample's FD alike, so the difference's
    # spread is far below that of the FD itself
    assert (boot["b"] - boot["a"]).std() < 0.1 * boot["a"].std()
    # the spread of FD over resamples is close to that over fresh sample sets of the same size
    fresh = torch.tensor([frechet_distance(torch.randn(200, 6, generator=g, dtype=torch.float64) + 0.3, ref)
                          for _ in range(40)])
    assert 0.4 < boot["a"].std() / fresh.std() < 2.5
    assert demo.with_noise(1.6, 2.0) == "+1.6±2.0%~" and demo.with_noise(-5.0, 1.0) == "-5.0±1.0% "
