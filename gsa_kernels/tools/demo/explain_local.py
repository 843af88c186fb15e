"""`python -m gsa_kernels explain --local`: do the local score machines (Kamb & Ganguli, ICML
2025, arXiv 2412.20292) predict the committed MNIST network, as they predict convolution-only
networks in the paper?

Two measurements, both on the same noise-level grid: the sigmas of the sampler's schedule
(Karras, --steps Heun steps), so the calibrated patch size of every step is the one the
machine samples with.

(1) Denoiser r^2 per sigma. For each local machine (LS, ELS, BB-ELS: zeros padding, the
    network's padding; --num-train training digits) the patch size P is calibrated per sigma as
    the paper does: the P whose output best matches the network's (r^2) on a calibration batch
    of noised held-out digits. r^2 is then reported on a *different* held-out batch, next to
    the Gaussian, the 10-component mixture and the ideal (delta mixture) denoisers, all fitted
    on the network's full training split.
    r^2(pred, net) = 1 - sum |pred - net|^2 / sum |net - mean(net)|^2 over the batch's pixels.
(2) Case by case. The same initial noise runs through the network and through every model
    with the same sampler (Heun) and schedule, the local machines with their per-step
    calibrated P; per pair, r^2 of the model's final sample against the network's (over that
    image's pixels); the median over --num-paths pairs is the paper's number.

Outputs in --out-dir: local_r2.csv (per sigma: calibrated P and r^2 per model),
local_calibration.csv (per sigma, machine and P: r^2 on the calibration batch),
local_case_by_case.csv (per initial noise: r^2 per model), local_pairs.png (network sample
beside each machine's, from the same noise).
"""
import csv
import time

import torch

import gsa_kernels as gk

from .data import mnist_split
from .net import load_denoiser

LOCAL = ("ls", "els", "bbels")
GLOBAL = ("gaussian", "mixture", "delta")
LABELS = {"gaussian": "Gaussian", "mixture": "10-mixture", "delta": "ideal (delta)", "ls": "LS", "els": "ELS",
          "bbels": "BB-ELS"}
QUICK = dict(num_train=16, patch_sizes=[1, 3, 5], steps=3, num_paths=4, calib_digits=4, local_digits=8, backend="cpu")
FULL = dict(num_train=100, patch_sizes=[1, 3, 5, 7, 9, 11, 13, 15], steps=6, num_paths=100, calib_digits=8,
            local_digits=16, backend="auto")


def fill_defaults(args):
    """The options not given: QUICK's with --quick, else FULL's (explicit options win)."""
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


class _Flat:
    """A [B, 784] model (Gaussian, mixture, delta) as a [B, 1, 28, 28] sampler denoiser."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, **_):
        if isinstance(sigma, torch.Tensor) and sigma.dim() > 0:
            sigma = sigma.reshape(-1).expand(x.shape[0]).to(x.dtype)
        return self.model.denoise(x.reshape(x.shape[0], -1), sigma).reshape(x.shape)


def per_image_r2(pred, target):
    """[B]: r^2 of pred[b] against target[b] over that image's pixels."""
    pred, target = pred.double().flatten(1), target.double().flatten(1)
    res = (pred - target).pow(2).sum(1)
    tot = (target - target.mean(1, keepdim=True)).pow(2).sum(1).clamp_min(1e-300)
    return 1 - res / tot


def save_pairs(images, names, path, rows=8):
    """One row per initial noise: the network's sample, then each model's from the same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, images[0].shape[0])
    fig, axes = plt.subplots(rows, len(names), figsize=(0.9 * len(names), 0.9 * rows + 0.3), squeeze=False)
    for j, (name, imgs) in enumerate(zip(names, images)):
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(imgs[i, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


@torch.no_grad()
def run(args):
    t0 = time.perf_counter()
    if args.quick:
        print("explain --local --quick: a SMOKE TEST (tiny training set, 3 sampler steps, a handful of digits); "
              "its numbers mean nothing. The full run: explain --local")
    train = mnist_split("train")[0]
    heldout = mnist_split("heldout")[0]
    g = torch.Generator().manual_seed(args.seed)
    sub = train[torch.randperm(train.shape[0], generator=g)[:args.num_train]]
    perm = torch.randperm(heldout.shape[0], generator=g)
    calib = heldout[perm[:args.calib_digits]]
    report = heldout[perm[args.calib_digits:args.calib_digits + args.local_digits]]
    net = load_denoiser()
    flat = train.reshape(train.shape[0], -1)
    models = {"gaussian": gk.GaussianModel.fit(flat),
              # --quick: 5 k-means iterations instead of 100 (the fit is most of a smoke test's time)
              "mixture": gk.GaussianMixture.fit(flat, args.mixture_components, min(args.mixture_rank, 784),
                                                iters=5 if args.quick else 100),
              "delta": gk.GaussianMixture.from_points(flat)}
    machines = {mode: gk.LocalScoreMachine(sub, mode, "zeros") for mode in LOCAL}
    schedule = gk.schedules.karras(args.steps)
    sigmas = [float(s) for s in schedule[:-1]]
    print(f"network: {sum(p.numel() for p in net.parameters())} parameters; local machines on {args.num_train} "
          f"training digits; patch sizes {args.patch_sizes}; {len(sigmas)} sigmas (Heun {args.steps} steps)")

    # (1) calibrate P per sigma on `calib`, report r^2 on `report`
    calib_rows, best = [], {}
    for mode, m in machines.items():
        t = time.perf_counter()
        table, scores = gk.local.calibrate_patch_size(m, net, calib, sigmas, args.patch_sizes, seed=args.seed,
                                                      backend=args.backend)
        best[mode] = table
        calib_rows += [{"sigma": s, "machine": mode, "patch_size": P, "r2": r2}
                       for s in sigmas for P, r2 in scores[s].items()]
        print(f"calibrated {LABELS[mode]:6s} in {time.perf_counter() - t:6.1f} s: P = "
              + ", ".join(f"{table[s]}@{s:.3g}" for s in sigmas))
    r2_rows = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    for s in sigmas:
        x = report + s * torch.randn(report.shape, generator=gen)
        d_net = net(x, s)
        row = {"sigma": s}
        for mode in LOCAL:
            row[f"P_{mode}"] = best[mode][s]
        for name, model in models.items():
            row[f"r2_{name}"] = gk.local.r_squared(_Flat(model)(x, s), d_net)
        for mode, m in machines.items():
            row[f"r2_{mode}"] = gk.local.r_squared(gk.local_denoise(x, s, m, best[mode][s], args.backend), d_net)
        r2_rows.append(row)
    print(f"denoiser r^2 against the network on {args.local_digits} other held-out digits:")
    names = list(GLOBAL) + list(LOCAL)
    print(f"{'sigma':>8s} " + " ".join(f"{LABELS[n]:>13s}" for n in names) + "   P (LS/ELS/BB-ELS)")
    for r in r2_rows:
        print(f"{r['sigma']:8.3g} " + " ".join(f"{r[f'r2_{n}']:13.4f}" for n in names)
              + f"   {r['P_ls']}/{r['P_els']}/{r['P_bbels']}")

    # (2) case by case: the same noise through the network and every model
    z = torch.randn((args.num_paths, 1, 28, 28), generator=gen) * float(schedule[0])
    finals = {"network": gk.sampling.sample(net, z, schedule, "heun").x}
    for name, model in models.items():
        finals[name] = gk.sampling.sample(_Flat(model), z, schedule, "heun").x
    for mode, m in machines.items():
        t = time.perf_counter()
        den = gk.local.LocalDenoiser(m, gk.local.patch_schedule(best[mode]), args.backend)
        finals[mode] = gk.sampling.sample(den, z, schedule, "heun").x
        print(f"sampled {args.num_paths} paths with {LABELS[mode]} in {time.perf_counter() - t:.1f} s")
    case = {name: per_image_r2(finals[name], finals["network"]) for name in names}
    case_rows = [{"path": i, **{f"r2_{n}": float(case[n][i]) for n in names}} for i in range(args.num_paths)]
    print(f"case by case, {args.num_paths} initial noises, Heun {args.steps} steps: median r^2 of the final "
          "sample against the network's (paper, MNIST ELS: 0.94 ResNet / 0.89 UNet)")
    for n in names:
        q = torch.quantile(case[n], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        print(f"  {LABELS[n]:13s} median {q[1]:.3f}  (IQR {q[0]:.3f} .. {q[2]:.3f})")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out_dir / "local_r2.csv", r2_rows)
    _write_csv(args.out_dir / "local_calibration.csv", calib_rows)
    _write_csv(args.out_dir / "local_case_by_case.csv", case_rows)
    order = ["network", "delta", "ls", "els", "bbels"]
    save_pairs([finals[n] for n in order], ["network"] + [LABELS[n] for n in order[1:]], args.out_dir / "local_pairs.png")
    print(f"wrote {args.out_dir}/local_r2.csv, local_calibration.csv, local_case_by_case.csv, local_pairs.png "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
