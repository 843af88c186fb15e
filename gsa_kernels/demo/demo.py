"""`python -m gsa_kernels demo`: analytical teleportation on MNIST, end to end.

1. Fit a GaussianModel and a 10-component GaussianMixture to the MNIST-5k training split.
2. Sample the committed EDM network with the EDM Heun sampler (default 18 steps = 35 NFE) from
   fixed seeds, and with the first round(f * steps) steps replaced by one teleport
   (gk.sampling.teleport = one gk.gaussian_flow call of the Gaussian's closed-form ODE from
   sigma_max to the sigma at which Heun resumes) for each skip fraction f.
   Equal-NFE baselines without teleportation: Heun with fewer steps over the whole range, and
   Heun started at the truncated sigma from plain Gaussian noise (what skipping steps without
   the closed-form jump does).
3. Report NFE, wall time and the Frechet distance against the held-out split in the
   classifier's feature space and in pixel space; reference rows: the training split itself
   (the floor) and samples of the fitted Gaussian and mixture (what the analytic models alone give).
Outputs in --out-dir: demo_table.csv, samples_<setting>.png (8x8 grids), quality_vs_nfe.png.
"""
import argparse
import csv
import time
from pathlib import Path

import torch

import gsa_kernels as gk

from .classifier import load_classifier
from .data import mnist_split
from .metrics import classifier_features, frechet_distance
from .net import load_denoiser

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gsa_kernels demo", description="MNIST: EDM Heun sampling of the demo network with and without analytical "
                                "teleportation; NFE, wall time, Frechet distances, sample grids and plots.")
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="output directory (default ./demo_out)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per setting (default 500)")
    p.add_argument("--steps", type=int, default=18, help="Heun steps of the full schedule (default 18 = 35 NFE)")
    p.add_argument("--skip-fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4],
                   help="fractions of the Heun steps replaced by the teleport (default 0 0.1 0.2 0.3 0.4)")
    p.add_argument("--mixture-components", type=int, default=10)
    p.add_argument("--mixture-rank", type=int, default=128, help="principal directions per mixture component")
    p.add_argument("--no-baselines", action="store_true", help="skip the equal-NFE baselines without teleportation")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every setting)")
    p.add_argument("--batch-size", type=int, default=500, help="network batch size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="CI setting: 48 samples, 6 steps, skip fractions 0 0.34")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.steps, args.skip_fractions, args.batch_size = 48, 6, [0.0, 0.34], 48
    if args.num_samples < 2 or args.steps < 2:
        p.error("--num-samples and --steps must be >= 2")
    if any(not 0 <= f < 1 for f in args.skip_fractions):
        p.error("--skip-fractions must be in [0, 1)")
    return args


def heun_nfe(num_steps):
    """Heun on a schedule ending at 0: two evaluations per step but one on the last."""
    return 2 * num_steps - 1


class ProgressDenoiser:
    """The network in batches of batch_size, one tqdm tick per evaluation (NFE) of the whole set."""

    def __init__(self, net, batch_size, bar):
        self.net, self.batch_size, self.bar, self.nfe = net, batch_size, bar, 0

    @torch.no_grad()
    def __call__(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        out = torch.cat([self.net(x[i:i + self.batch_size], sigma[i:i + self.batch_size])
                         for i in range(0, x.shape[0], self.batch_size)])
        self.nfe += 1
        self.bar.update(1)
        return out


def run_settings(args, net, gaussian, noise):
    """Runs every setting from the same noise [N, D]; one dict per setting with name, method,
    skip_fraction, steps (Heun steps run), sigma_start, nfe, seconds (teleport included) and
    samples [N, D] (clamped to [-1, 1])."""
    from tqdm import tqdm

    full = gk.schedules.karras(args.steps, SIGMA_MIN, SIGMA_MAX, RHO)
    settings = []  # (name, method, fraction, schedule, teleport?)
    skips = {}  # steps skipped -> the first fraction asking for it (fractions that round alike run once)
    for f in args.skip_fractions:
        skips.setdefault(round(f * args.steps), f)
    for k, f in skips.items():
        settings.append((f"teleport_{round(100 * f)}pct" if k else "heun_full", "teleport" if k else "heun", f, full[k:], k > 0))
    if not args.no_baselines:
        for k, f in skips.items():
            if k == 0:
                continue
            settings.append((f"fewer_steps_{round(100 * f)}pct", "heun, fewer steps", f,
                             gk.schedules.karras(args.steps - k, SIGMA_MIN, SIGMA_MAX, RHO), False))
            settings.append((f"truncated_{round(100 * f)}pct", "truncated, no teleport", f, full[k:], False))
    total = sum(heun_nfe(len(s) - 1) for _, _, _, s, _ in settings)
    results = []
    with tqdm(total=total, desc="sampling (network evaluations)", unit="NFE") as bar:
        for name, method, f, sigmas, teleport in settings:
            den = ProgressDenoiser(net, args.batch_size, bar)
            t0 = time.perf_counter()
            x = noise * float(sigmas[0]) if method != "teleport" else noise * SIGMA_MAX
            if teleport:  # x at sigma_max -> x at sigmas[0], zero network evaluations
                x = gk.sampling.teleport(x, SIGMA_MAX, float(sigmas[0]), gaussian)
            x = gk.sampling.heun(den, x, sigmas)
            seconds = time.perf_counter() - t0
            results.append(dict(name=name, method=method, skip_fraction=f, steps=len(sigmas) - 1,
                                sigma_start=float(sigmas[0]), nfe=den.nfe, seconds=seconds, samples=x.clamp(-1, 1)))
    return results


def save_grid(x, path, title=None, n=8):
    """An n x n grid of the first n^2 images of x [N, 784] in [-1, 1] as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(n * n, x.shape[0])
    imgs = torch.full((n * n, 28, 28), -1.0)
    imgs[:k] = x[:k].reshape(k, 28, 28)
    grid = imgs.reshape(n, n, 28, 28).permute(0, 2, 1, 3).reshape(n * 28, n * 28)
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_plot(rows, path):
    """Feature-space and pixel-space Frechet distance vs NFE, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "fd_features", "Frechet distance (classifier features)"),
                           (axes[1], "fd_pixels", "Frechet distance (pixels)")):
        methods = {}
        for r in rows:
            if r["nfe"] > 0 and r["method"] != "heun":
                methods.setdefault("heun + teleport" if r["method"] == "teleport" else r["method"], []).append(r)
        full = [r for r in rows if r["method"] == "heun"]  # every line starts at the full schedule
        methods = {m: rs + full for m, rs in methods.items()} if methods else {"heun": full}
        for m, rs in methods.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], "o-", label=m)
        floor = [r for r in rows if r["name"] == "training_data"]
        if floor:
            ax.axhline(floor[0][key], color="gray", ls="--", label="training data (floor)")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MNIST, EDM Heun: quality vs NFE with analytical teleportation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = ["name", "method", "skip_fraction", "steps", "sigma_start", "nfe", "seconds", "fd_features", "fd_pixels",
           "fd_features_vs_full_pct", "fd_pixels_vs_full_pct"]


def format_table(rows):
    head = f"{'setting':24s} {'method':24s} {'skip':>5s} {'steps':>5s} {'sigma0':>7s} {'NFE':>4s} {'time s':>7s} {'FD feat':>8s} {'FD pix':>8s} {'dFD feat':>9s} {'dFD pix':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = lambda v: "" if v == "" else f"{v:+.1f}%"
        lines.append(f"{r['name']:24s} {r['method']:24s} {r['skip_fraction']:5.2f} {r['steps']:5d} {r['sigma_start']:7.3g} "
                     f"{r['nfe']:4d} {r['seconds']:7.2f} {r['fd_features']:8.3f} {r['fd_pixels']:8.2f} "
                     f"{pct(r['fd_features_vs_full_pct']):>9s} {pct(r['fd_pixels_vs_full_pct']):>8s}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train, _ = mnist_split("train")
    heldout, _ = mnist_split("heldout")
    train, heldout = train.reshape(train.shape[0], -1), heldout.reshape(heldout.shape[0], -1)
    net, clf = load_denoiser(), load_classifier()

    t0 = time.perf_counter()
    gaussian = gk.GaussianModel.fit(train)
    mixture = gk.GaussianMixture.fit(train, args.mixture_components, min(args.mixture_rank, train.shape[1]))
    print(f"fitted {gaussian} and {mixture} in {time.perf_counter() - t0:.1f} s")

    noise = torch.randn(args.num_samples, train.shape[1], generator=torch.Generator().manual_seed(args.seed))
    results = run_settings(args, net, gaussian, noise)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_ref = min(args.num_samples, train.shape[0])
    for name, method, x, seconds in (
            ("training_data", "training split (floor)", train[torch.randperm(train.shape[0], generator=gen)[:n_ref]], 0.0),
            ("gaussian_samples", "fitted Gaussian", gaussian.sample(args.num_samples, gen).clamp(-1, 1), 0.0),
            ("mixture_samples", f"fitted {args.mixture_components}-mixture", mixture.sample(args.num_samples, gen).clamp(-1, 1), 0.0)):
        results.append(dict(name=name, method=method, skip_fraction=0.0, steps=0, sigma_start=0.0, nfe=0, seconds=seconds, samples=x))

    heldout_feat = classifier_features(clf, heldout)
    full = next((r for r in results if r["name"] == "heun_full"), None)
    for r in results:
        r["fd_features"] = frechet_distance(classifier_features(clf, r["samples"]), heldout_feat)
        r["fd_pixels"] = frechet_distance(r["samples"], heldout)
    for r in results:
        for key in ("fd_features", "fd_pixels"):
            r[f"{key}_vs_full_pct"] = 100 * (r[key] / full[key] - 1) if full and r["nfe"] > 0 else ""
        save_grid(r["samples"], args.out_dir / f"samples_{r['name']}.png",
                  f"{r['name']}: NFE {r['nfe']}, FD feat {r['fd_features']:.2f}, FD pix {r['fd_pixels']:.1f}")

    with open(args.out_dir / "demo_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    save_plot(results, args.out_dir / "quality_vs_nfe.png")
    print(format_table(results))
    print(f"wrote {args.out_dir}/demo_table.csv, quality_vs_nfe.png and samples_*.png "
          f"({args.num_samples} samples per setting vs {heldout.shape[0]} held-out digits)")
    return 0
