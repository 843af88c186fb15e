"""`python -m gsa_kernels demo`: analytical teleportation on MNIST, end to end.

1. Fit a GaussianModel and a 10-component GaussianMixture to the MNIST-5k training split.
2. For each run SAMPLER:STEPS:FRACTIONS (default: Heun at 18 steps, and the low-NFE regime:
   Heun at 8 steps and DPM++ 2M at 10 steps), sample the committed EDM network from fixed seeds
   on the full Karras schedule, and for each skip fraction f:
     teleport   the first k = round(f * STEPS) steps replaced by one closed-form jump of the
                Gaussian's PF-ODE from sigma_max to the sigma where the sampler resumes
                (gk.sampling.teleport: one gk.gaussian_flow call, no network evaluation);
     fewer      the same sampler with STEPS - k steps over the whole range (same NFE);
     truncated  the full schedule cut at the same sigma, started from plain Gaussian noise there
                (what skipping the steps without the jump does; same NFE).
3. Report NFE and the Frechet distance (FD, lower is better) against the held-out split in the
   classifier's feature space and in pixel space, and each FD's change against the full run of
   its sampler; reference rows: the training split itself (the floor) and samples of the fitted
   Gaussian and mixture (what the analytic models alone give). The network's time per NFE is
   measured once over every setting (a setting's sampling time is NFE times it, plus the jump).
Outputs in --out-dir: demo_table.csv (+ demo_table_columns.txt, what each column means),
samples_<setting>.png (8x8 grids), quality_vs_nfe.png.
"""
import csv
import time

import torch

import gsa_kernels as gk

from .classifier import load_classifier
from .cli import CONDITIONAL_RUNS, DEFAULT_RUNS, QUICK_CONDITIONAL_RUNS, QUICK_RUNS, demo_parser, run_spec
from .data import mnist_split
from .metrics import bootstrap_fd, classifier_features, frechet_distance
from .net import load_denoiser

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
SAMPLER_NAMES = {"heun": "Heun", "dpmpp_2m": "DPM++ 2M"}
VARIANTS = ("full", "teleport", "fewer steps", "truncated")


def parse_args(argv):
    p = demo_parser()
    args = p.parse_args(argv)
    # --quick fills only what was not given (issue 25: it used to override --num-samples)
    if args.num_samples is None:
        args.num_samples = (40 if args.conditional else 48) if args.quick else 500
    if args.batch_size is None:
        args.batch_size = min(args.num_samples, 500)
    if args.bootstrap is None:
        args.bootstrap = 20 if args.quick else 100
    if args.runs is None:
        runs = (QUICK_CONDITIONAL_RUNS if args.conditional else QUICK_RUNS) if args.quick else (
            CONDITIONAL_RUNS if args.conditional else DEFAULT_RUNS)
        args.runs = [run_spec(r) for r in runs]
    if args.conditional and args.num_samples < 20:
        p.error("--num-samples must be >= 20 with --conditional (2 per class for the per-class Frechet distances)")
    return args


class TimedDenoiser:
    """The network in batches of batch_size; counts evaluations of the whole set (NFE), times
    them, and ticks a tqdm bar once per NFE. labels (the conditional network's class per row) are
    passed on batch by batch when given."""

    def __init__(self, net, batch_size, bar):
        self.net, self.batch_size, self.bar, self.nfe, self.seconds = net, batch_size, bar, 0, 0.0

    @torch.no_grad()
    def __call__(self, x, sigma, labels=None):
        t0 = time.perf_counter()
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        batches = range(0, x.shape[0], self.batch_size)
        cut = lambda t, i: t[i:i + self.batch_size]
        out = torch.cat([self.net(cut(x, i), cut(sigma, i)) if labels is None
                         else self.net(cut(x, i), cut(sigma, i), cut(labels, i)) for i in batches])
        self.seconds += time.perf_counter() - t0
        self.nfe += 1
        self.bar.update(1)
        return out


def plan_settings(runs, baselines=True):
    """[(name, run label, sampler, variant, skipped steps k, full steps, schedule)] for the runs
    [(sampler, steps, fractions)]; fractions that round to the same k run once."""
    settings = []
    for sampler, steps, fractions in runs:
        tag, label = f"{sampler}{steps}", f"{SAMPLER_NAMES[sampler]}, {steps} steps"
        full = gk.schedules.karras(steps, SIGMA_MIN, SIGMA_MAX, RHO)
        settings.append((f"{tag}_full", label, sampler, "full", 0, steps, full))
        for k in sorted({min(max(round(f * steps), 1), steps - 1) for f in fractions}):
            settings.append((f"{tag}_teleport{k}", label, sampler, "teleport", k, steps, full[k:]))
            if baselines:
                settings.append((f"{tag}_fewer{k}", label, sampler, "fewer steps", k, steps,
                                 gk.schedules.karras(steps - k, SIGMA_MIN, SIGMA_MAX, RHO)))
                settings.append((f"{tag}_truncated{k}", label, sampler, "truncated", k, steps, full[k:]))
    return settings


def run_settings(args, net, gaussian, noise):
    """Samples every setting from the same noise [N, D]. Returns (rows, network seconds per NFE,
    mean seconds of one teleport jump); a row has name, run, sampler, variant, skipped_steps,
    full_steps, sigma_start, nfe and samples [N, D] (clamped to [-1, 1])."""
    from tqdm import tqdm

    settings = plan_settings(args.runs, not args.no_baselines)
    total = sum(gk.sampling.expected_nfe(sampler, s) for _, _, sampler, *_, s in settings)
    rows, jumps = [], []
    with tqdm(total=total, desc="sampling (network evaluations of all samples)", unit="NFE") as bar:
        den = TimedDenoiser(net, args.batch_size, bar)
        for name, run, sampler, variant, k, steps, sigmas in settings:
            start = den.nfe
            if variant == "teleport":  # x at sigma_max -> x at sigmas[0], no network evaluation
                t0 = time.perf_counter()
                x = gk.sampling.teleport(noise * SIGMA_MAX, SIGMA_MAX, float(sigmas[0]), gaussian)
                jumps.append(time.perf_counter() - t0)
            else:
                x = noise * float(sigmas[0])
            x = gk.sampling.SAMPLERS[sampler](den, x, sigmas)
            rows.append(dict(name=name, run=run, sampler=sampler, variant=variant, skipped_steps=k, full_steps=steps,
                             sigma_start=float(sigmas[0]), nfe=den.nfe - start, samples=x.clamp(-1, 1)))
    return rows, den.seconds / max(den.nfe, 1), sum(jumps) / max(len(jumps), 1)


def setting_title(r):
    if r["variant"] == "reference":
        return r["run"]
    k, n = r["skipped_steps"], r["full_steps"]
    what = {"full": f"all {n} steps", "teleport": f"first {k} of {n} steps teleported",
            "fewer steps": f"{n - k} steps instead of {n}",
            "truncated": f"first {k} of {n} steps cut, no teleport"}[r["variant"]]
    return f"{r['run'].split(',')[0]}: {what}"


def save_grid(x, path, title, n=8):
    """A grid of the first n^2 images of x [N, 784] in [-1, 1], n per row, as a PNG about 800
    pixels wide (each digit about 3x its 28 pixels, 2-pixel gaps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, cell = min(n * n, x.shape[0]), 30
    grid = torch.ones(-(-k // n) * cell, n * cell)  # white gaps
    for i in range(k):
        r, c = divmod(i, n)
        grid[r * cell + 1:r * cell + 29, c * cell + 1:c * cell + 29] = x[i].reshape(28, 28)
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * grid.shape[0] / grid.shape[1] + 0.5))
    ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


MARKERS = {"full": "*", "teleport": "o", "fewer steps": "s", "truncated": "^"}
DODGE = {"full": 0.0, "teleport": 0.0, "fewer steps": -0.15, "truncated": 0.15}  # equal-NFE points side by side
COLORS = {"full": "black", "teleport": "tab:green", "fewer steps": "tab:blue", "truncated": "tab:red"}


def save_plot(rows, path):
    """Left: feature FD vs NFE, every setting a marked point, each teleport joined to its full
    run. Middle and right: the change of FD against the full run of the same sampler, at equal
    NFE, teleport vs fewer steps vs truncated (a difference panel: no curve hides another)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sampled = [r for r in rows if r["variant"] in VARIANTS]
    runs = list(dict.fromkeys(r["run"] for r in sampled))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    ax = axes[0]
    for run in runs:
        rs = [r for r in sampled if r["run"] == run]
        full = next(r for r in rs if r["variant"] == "full")
        for r in rs:
            ax.plot(r["nfe"] + DODGE[r["variant"]], r["fd_features"], MARKERS[r["variant"]], color=COLORS[r["variant"]], ms=9, mfc="none" if
                    r["variant"] != "full" else COLORS["full"], mew=1.6)
            if r["variant"] == "teleport":
                ax.plot([r["nfe"], full["nfe"]], [r["fd_features"], full["fd_features"]], color="tab:green", lw=0.8)
        ax.annotate(run, (full["nfe"], full["fd_features"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for variant in VARIANTS:
        ax.plot([], [], MARKERS[variant], color=COLORS[variant], mfc="none" if variant != "full" else "black",
                label={"full": "full schedule"}.get(variant, variant))
    floor = [r for r in rows if r["name"] == "training_data"]
    if floor:
        ax.axhline(floor[0]["fd_features"], color="gray", ls="--", label="training digits (floor)")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("Frechet distance, classifier features (lower is better)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("quality vs cost (lower is better)", fontsize=10)
    for ax, key, label in ((axes[1], "fd_features", "classifier features"), (axes[2], "fd_pixels", "pixels")):
        groups = [(run, k) for run in runs for k in sorted({r["skipped_steps"] for r in sampled
                                                             if r["run"] == run and r["variant"] == "teleport"})]
        width = 0.8 / 3
        for j, variant in enumerate(VARIANTS[1:]):
            vals = [next((r[f"{key}_vs_full_pct"] for r in sampled if (r["run"], r["skipped_steps"], r["variant"]) ==
                          (run, k, variant)), float("nan")) for run, k in groups]
            bars = ax.bar([i + (j - 1) * width for i in range(len(groups))], vals, width, color=COLORS[variant],
                          label=variant)
            ax.bar_label(bars, fmt="%+.1f%%", fontsize=7, padding=2)
        full_nfe = {r["run"]: r["nfe"] for r in sampled if r["variant"] == "full"}
        nfe = {(r["run"], r["skipped_steps"]): r["nfe"] for r in sampled if r["variant"] == "teleport"}
        ax.set_xticks(range(len(groups)), [f"{run}\nskip {k}: NFE {full_nfe[run]} -> {nfe[run, k]}" for run, k in groups],
                      fontsize=7, rotation=35, ha="right", rotation_mode="anchor")  # long labels: no overlap
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("FD change vs the full schedule, % (lower is better)")
        ax.set_title(f"FD in {label}: change vs the full run\n(below 0 = better than the full run)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("MNIST, committed EDM network: skipping the first steps with the closed-form Gaussian jump "
                 "(teleport) vs without it. Frechet distance to held-out digits: lower is better.", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = {  # CSV column -> what it is (demo_table_columns.txt)
    "name": "setting id (also the name of its sample grid samples_<name>.png)",
    "run": "sampler and its number of steps on the full schedule",
    "variant": "full = every step; teleport = the first skipped_steps replaced by the closed-form Gaussian jump; "
               "fewer steps = the same sampler with full_steps - skipped_steps steps over the whole range; "
               "truncated = the full schedule cut at sigma_start, started from plain noise there; reference = not sampled",
    "skipped_steps": "steps of the full schedule not run by the network",
    "full_steps": "steps of the full schedule",
    "sigma_start": "noise level at which the network sampler starts (80 = pure noise)",
    "nfe": "network evaluations per sample: the cost (lower is cheaper)",
    "fd_features": "Frechet distance to the held-out digits in the classifier's 128-d feature space (lower is better)",
    "fd_pixels": "Frechet distance to the held-out digits in pixel space, 784-d (lower is better)",
    "fd_features_vs_full_sd": "standard deviation of fd_features_vs_full_pct over a paired bootstrap of the generated "
                              "samples (same resampled indices for every setting; held-out digits fixed)",
    "fd_pixels_vs_full_sd": "the same for fd_pixels_vs_full_pct",
    "fd_features_vs_full_pct": "change of fd_features against the full run of the same sampler and steps, % "
                               "(negative = better than the full run; lower is better)",
    "fd_pixels_vs_full_pct": "the same for fd_pixels",
}


def add_uncertainties(rows, heldout_feat, heldout, resamples, seed):
    """r[key + "_vs_full_sd"]: the standard deviation of each dFD over a paired bootstrap of the
    generated samples (metrics.bootstrap_fd; the held-out digits fixed)."""
    sampled = [r for r in rows if r["variant"] in VARIANTS]
    if resamples < 2 or not sampled:
        return
    for key, what, ref in (("fd_features", "features", heldout_feat), ("fd_pixels", "samples", heldout)):
        boot = bootstrap_fd({r["name"]: r[what] for r in sampled}, ref, resamples, seed)
        for r in sampled:
            full = next(f for f in sampled if f["run"] == r["run"] and f["variant"] == "full")
            if r is not full:
                r[f"{key}_vs_full_sd"] = (100 * (boot[r["name"]] / boot[full["name"]] - 1)).std().item()


def with_noise(value, sd):
    """'+1.6±2.0%~': a dFD, its bootstrap sd, and '~' when |dFD| < 2 sd (within the noise)."""
    if value == "":
        return ""
    if sd == "":
        return f"{value:+.1f}%"
    return f"{value:+.1f}±{sd:.1f}%" + ("~" if abs(value) < 2 * sd else " ")


def format_table(rows, num_samples, num_heldout):
    lines = [
        f"Quality of {num_samples} samples per setting: Frechet distance (FD) to the {num_heldout} held-out digits. "
        "LOWER IS BETTER.",
        "  FD feat / FD pix: FD in the classifier's 128-d feature space (like FID) / in pixel space (784-d)",
        "  dFD: change of FD against the full schedule of the same sampler (first row of each run), in %; "
        "negative = better",
        "  ±: standard deviation of dFD over a paired bootstrap of the generated samples (the same resampled indices "
        "for every setting; held-out digits fixed); ~: within noise (|dFD| < 2 sd)",
        "  NFE: network evaluations per sample (the cost); skip: steps not run by the network; "
        "sigma0: where the network starts (80 = pure noise)",
        "  teleport: skipped steps replaced by the closed-form Gaussian jump; fewer steps: the same range in fewer "
        "steps; truncated: cut off, plain noise at sigma0",
    ]
    head = (f"{'run':24s} {'setting':12s} {'skip':>6s} {'NFE':>4s} {'sigma0':>7s} {'FD feat':>8s} {'dFD feat':>14s} "
            f"{'FD pix':>8s} {'dFD pix':>14s}")
    lines += [head, "-" * len(head)]
    previous = None
    for r in rows:
        run = r["run"] if r["run"] != previous else ""
        previous = r["run"]
        skip = f"{r['skipped_steps']}/{r['full_steps']}" if r["variant"] in VARIANTS else ""
        nfe = f"{r['nfe']:4d}" if r["variant"] in VARIANTS else "   -"
        sigma0 = f"{r['sigma_start']:7.3g}" if r["variant"] in VARIANTS else "      -"
        lines.append(f"{run:24s} {r['variant']:12s} {skip:>6s} {nfe} {sigma0} {r['fd_features']:8.2f} "
                     f"{with_noise(r['fd_features_vs_full_pct'], r['fd_features_vs_full_sd']):>14s} {r['fd_pixels']:8.1f} "
                     f"{with_noise(r['fd_pixels_vs_full_pct'], r['fd_pixels_vs_full_sd']):>14s}")
    return "\n".join(lines)


def summarise(rows):
    """One line per teleport: what it saves and what it costs, next to the equal-NFE baselines."""
    lines = []
    for r in rows:
        if r["variant"] != "teleport":
            continue
        same = {b["variant"]: b for b in rows if (b["run"], b["skipped_steps"]) == (r["run"], r["skipped_steps"])}
        full = next(b for b in rows if b["run"] == r["run"] and b["variant"] == "full")
        d = lambda b: with_noise(b["fd_features_vs_full_pct"], b["fd_features_vs_full_sd"]).strip()
        others = ", ".join(f"{v} {d(same[v])}" for v in ("fewer steps", "truncated") if v in same)
        lines.append(f"{r['run']}: teleporting {r['skipped_steps']} step{'s' * (r['skipped_steps'] > 1)} saves {full['nfe'] - r['nfe']} of "
                     f"{full['nfe']} NFE and changes feature FD by {d(r)}"
                     + (f" (at the same NFE without the jump: {others})" if others else ""))
    if lines:
        lines.append("(~: within the noise of this many samples, |dFD| < 2 bootstrap sd)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        print(f"SMOKE TEST (--quick): {args.num_samples} samples per setting, a few steps: the Frechet distances below "
              "check that everything runs, they are not a result (run without --quick)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.conditional:
        from . import conditional

        return conditional.main(args)
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
    results, seconds_per_nfe, jump_seconds = run_settings(args, net, gaussian, noise)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_ref = min(args.num_samples, train.shape[0])
    for name, label, x in (
            ("training_data", "training digits (floor)", train[torch.randperm(train.shape[0], generator=gen)[:n_ref]]),
            ("gaussian_samples", "fitted Gaussian alone", gaussian.sample(args.num_samples, gen).clamp(-1, 1)),
            ("mixture_samples", f"fitted {args.mixture_components}-mixture alone",
             mixture.sample(args.num_samples, gen).clamp(-1, 1))):
        results.append(dict(name=name, run=label, sampler="", variant="reference", skipped_steps=0, full_steps=0,
                            sigma_start=0.0, nfe=0, samples=x))

    heldout_feat = classifier_features(clf, heldout)
    for r in results:
        r["features"] = classifier_features(clf, r["samples"])
        r["fd_features"] = frechet_distance(r["features"], heldout_feat)
        r["fd_pixels"] = frechet_distance(r["samples"], heldout)
    for r in results:
        full = next((f for f in results if f["run"] == r["run"] and f["variant"] == "full"), None)
        for key in ("fd_features", "fd_pixels"):
            r[f"{key}_vs_full_pct"] = 100 * (r[key] / full[key] - 1) if full and r is not full else ""
            r[f"{key}_vs_full_sd"] = ""
        nfe = f"NFE {r['nfe']}, " if r["variant"] != "reference" else ""
        save_grid(r["samples"], args.out_dir / f"samples_{r['name']}.png",
                  f"{setting_title(r)}\n{nfe}FD features {r['fd_features']:.2f}, FD pixels {r['fd_pixels']:.1f} "
                  "(lower is better)")

    add_uncertainties(results, heldout_feat, heldout, args.bootstrap, args.seed)

    with open(args.out_dir / "demo_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    with open(args.out_dir / "demo_table_columns.txt", "w") as fh:
        fh.write("".join(f"{k}: {v}\n" for k, v in COLUMNS.items()))
    save_plot(results, args.out_dir / "quality_vs_nfe.png")
    print(format_table(results, args.num_samples, heldout.shape[0]))
    print(summarise(results))
    print(f"time: the network takes {seconds_per_nfe:.2f} s per NFE for {args.num_samples} samples "
          f"({torch.get_num_threads()} threads), so a setting costs about NFE x {seconds_per_nfe:.2f} s; "
          f"one teleport jump takes {1e3 * jump_seconds:.1f} ms")
    print(f"wrote {args.out_dir}/demo_table.csv (columns explained in demo_table_columns.txt), quality_vs_nfe.png "
          f"and samples_*.png")
    return 0
