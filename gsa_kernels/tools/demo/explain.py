"""`python -m gsa_kernels explain`: how much of the trained network's denoiser the analytic
denoisers explain, across noise levels (Wang & Vastola's central figure).

For a noise level sigma, a split S (held-out or training digits) and an analytic model M
(the fitted Gaussian, the fitted 10-component mixture, the training-set delta mixture
GaussianMixture.from_points(train)), with N digits x0_i of S and fixed unit noise eps_i,
x_i = x0_i + sigma eps_i:

    EV_M(sigma) = 1 - sum_i |D_net(x_i, sigma) - D_M(x_i, sigma)|^2
                      / sum_i |D_net(x_i, sigma) - mean_j D_net(x_j, sigma)|^2

i.e. one minus the residual of M's prediction of the network's denoiser output, relative to
the variance of that output across the batch (the R^2 of M as a predictor of the network).
1 = M reproduces the network; 0 = no better than the batch-mean output; negative = worse.
Outputs in --out-dir: explained_variance.csv (one row per sigma and split) and
explained_variance.png.

With --local: the local score machines instead (explain_local.py).
"""
import csv
import math

import torch

import gsa_kernels as gk

from .cli import explain_parser
from .data import mnist_split
from .net import load_denoiser

MODELS = ("gaussian", "mixture", "delta")


def parse_args(argv):
    p = explain_parser()
    args = p.parse_args(argv)
    if args.local:
        from .explain_local import fill_defaults

        fill_defaults(args)
        if any(P % 2 == 0 for P in args.patch_sizes):
            p.error(f"--patch-sizes must be odd (a window centred on the pixel), got {args.patch_sizes}")
        return args
    # --quick fills only what was not given (issue 25: it used to override explicit options)
    quick = dict(num_samples=32, num_sigmas=4, splits=["heldout"])
    full = dict(num_samples=500, num_sigmas=17, splits=["heldout", "train"])
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        print("SMOKE TEST (--quick): too few digits and noise levels for the numbers to mean anything; "
              "run without --quick for results")
    return args


def explained_variance(d_net, d_model):
    """1 - sum |d_net - d_model|^2 / sum |d_net - mean(d_net)|^2 over a batch [N, D] (float64)."""
    d_net, d_model = d_net.double(), d_model.double()
    residual = (d_net - d_model).pow(2).sum()
    total = (d_net - d_net.mean(0)).pow(2).sum()
    return (1 - residual / total).item()


@torch.no_grad()
def explain(net, models, x0, sigmas, eps, batch_size=500):
    """[{sigma, ev_<model>...}] for digits x0 [N, D] and noise eps [N, D]."""
    from tqdm import tqdm

    rows = []
    for sigma in tqdm(sigmas, desc="explain (noise levels)"):
        x = x0 + sigma * eps
        d_net = torch.cat([net(x[i:i + batch_size], sigma) for i in range(0, x.shape[0], batch_size)])
        row = {"sigma": sigma, "net_output_variance": (d_net - d_net.mean(0)).pow(2).sum(1).mean().item()}
        for name, m in models.items():
            row[f"ev_{name}"] = explained_variance(d_net, m.denoise(x, sigma))
        rows.append(row)
    return rows


def save_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"gaussian": "Gaussian", "mixture": "10-mode mixture", "delta": "training set (delta mixture)"}
    splits = sorted({r["split"] for r in rows})
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        rs = [r for r in rows if r["split"] == split]
        for m in MODELS:
            ax.plot([r["sigma"] for r in rs], [max(r[f"ev_{m}"], -0.5) for r in rs], "o-", ms=3, label=labels[m])
        ax.set_xscale("log")
        ax.set_ylim(-0.55, 1.05)
        ax.axhline(1, color="gray", lw=0.5)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("sigma")
        ax.set_ylabel("fraction of network denoiser variance explained (clipped at -0.5)")
        ax.set_title(f"noised {split} digits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.local:
        from .explain_local import run

        return run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train = mnist_split("train")[0].reshape(-1, 784)
    net = load_denoiser()
    models = {"gaussian": gk.GaussianModel.fit(train),
              "mixture": gk.GaussianMixture.fit(train, args.mixture_components, min(args.mixture_rank, 784)),
              "delta": gk.GaussianMixture.from_points(train)}
    sigmas = torch.logspace(math.log10(0.002), math.log10(80.0), args.num_sigmas, dtype=torch.float64).tolist()
    rows = []
    for split in args.splits:
        g = torch.Generator().manual_seed(args.seed)
        data = mnist_split(split)[0].reshape(-1, 784)
        x0 = data[torch.randperm(data.shape[0], generator=g)[:args.num_samples]]
        eps = torch.randn(x0.shape, generator=g)
        rows += [{"split": split, **r} for r in explain(net, models, x0, sigmas, eps)]
    cols = ["split", "sigma", "net_output_variance"] + [f"ev_{m}" for m in MODELS]
    with open(args.out_dir / "explained_variance.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    save_plot(rows, args.out_dir / "explained_variance.png")
    print(f"{'split':8s} {'sigma':>8s} {'Gaussian':>9s} {'10-mix':>9s} {'delta':>9s}")
    for r in rows:
        print(f"{r['split']:8s} {r['sigma']:8.3g} {r['ev_gaussian']:9.4f} {r['ev_mixture']:9.4f} {r['ev_delta']:9.4f}")
    print(f"wrote {args.out_dir}/explained_variance.csv and explained_variance.png")
    return 0
