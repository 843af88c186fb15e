"""`python -m gsa_kernels demo --conditional`: class-conditional teleportation on MNIST.

The committed class-conditional network (`train-demo-model --conditional`) samples digits of
given labels (balanced: sample i has label i % 10) from fixed seeds. For each run
SAMPLER:STEPS:FRACTIONS (default Heun, 18 steps, skipping 10-40 % of them) it compares

    full             every step, no teleport;
    teleport         the first k steps replaced by one closed-form jump, each sample along the
                     Gaussian of its own class (GaussianMixture.fit_per_class, labels=y);
    teleport global  the same jump along the one Gaussian of all digits (GaussianModel.fit): the
                     wrong target for a conditional network, the baseline that shows why the
                     class matters;
    fewer steps      no teleport, the same sampler with STEPS - k steps (same NFE).

Quality: Frechet distance (the demo's classifier-feature FD, lower is better) of all samples to
all held-out digits, and per class (samples of class c against the held-out digits of class
c); and the accuracy of the committed classifier on the samples against their labels (higher
is better). Reference rows: training digits (the floor), samples of the class Gaussians alone
and of the global Gaussian alone.
Outputs in --out-dir: conditional_table.csv, conditional_samples_<setting>.png (10 x 10 grids,
one class per column).
"""
import csv
import time

import torch

import gsa_kernels as gk

from .classifier import load_classifier
from .data import mnist_split
from .demo import RHO, SAMPLER_NAMES, SIGMA_MAX, SIGMA_MIN, TimedDenoiser, save_grid
from .metrics import bootstrap_fd, classifier_features, frechet_distance
from .net import NUM_CLASSES, load_denoiser

VARIANTS = ("full", "teleport", "teleport global", "fewer steps")


def plan_settings(runs, baselines=True):
    """[(name, run label, sampler, variant, skipped steps k, full steps, schedule)]; baselines=False
    leaves out the fewer-steps rows (the global-Gaussian teleport stays: it is the comparison)."""
    settings = []
    for sampler, steps, fractions in runs:
        tag, label = f"{sampler}{steps}", f"{SAMPLER_NAMES[sampler]}, {steps} steps"
        full = gk.schedules.karras(steps, SIGMA_MIN, SIGMA_MAX, RHO)
        settings.append((f"{tag}_full", label, sampler, "full", 0, steps, full))
        for k in sorted({gk.schedules.skip_index(steps, f) for f in fractions} - {0}):
            settings.append((f"{tag}_teleport{k}", label, sampler, "teleport", k, steps, full))
            settings.append((f"{tag}_teleport_global{k}", label, sampler, "teleport global", k, steps, full))
            if baselines:
                settings.append((f"{tag}_fewer{k}", label, sampler, "fewer steps", k, steps,
                                 gk.schedules.karras(steps - k, SIGMA_MIN, SIGMA_MAX, RHO)))
    return settings


def run_settings(args, net, per_class, global_gaussian, noise, labels):
    """Samples of every setting from the same noise and labels; rows as in demo.run_settings."""
    from tqdm import tqdm

    settings = plan_settings(args.runs, not args.no_baselines)
    total = sum(gk.sampling.expected_nfe(sampler, s[k:] if v.startswith("teleport") else s)
                for _, _, sampler, v, k, _, s in settings)
    rows = []
    with tqdm(total=total, desc="sampling (network evaluations of all samples)", unit="NFE") as bar:
        den = TimedDenoiser(net, args.batch_size, bar)
        for name, run, sampler, variant, k, steps, sigmas in settings:
            start = den.nfe
            gaussian = {"teleport": per_class, "teleport global": global_gaussian}.get(variant)
            # sample(): the labels go to the network; a per-class mixture teleports row b with class labels[b]
            res = gk.sampling.sample(den, noise * float(sigmas[0]), sigmas, sampler, labels=labels, gaussian=gaussian,
                                     skip_fraction=k / steps if gaussian is not None else None)
            assert res.nfe == den.nfe - start
            rows.append(dict(name=name, run=run, sampler=sampler, variant=variant, skipped_steps=k, full_steps=steps,
                             sigma_start=float(res.sigmas[0]), nfe=res.nfe, samples=res.x.clamp(-1, 1)))
    return rows, den.seconds / max(den.nfe, 1)


def class_gaussian_samples(per_class, labels, generator):
    """x0 ~ N(class Gaussian of labels[i]) for each i, [N, D]."""
    out = torch.empty(labels.shape[0], per_class.dim, dtype=per_class.dtype)
    for k in range(per_class.num_components):
        rows = (labels == k).nonzero()[:, 0]
        g = gk.GaussianModel(per_class.means[k], per_class.bases[k], per_class.eigvals[k],
                             float(per_class.residual_var[k]))
        out[rows] = g.sample(rows.numel(), generator)
    return out


def evaluate(rows, clf, heldout, heldout_labels, labels):
    """Adds fd (all samples vs all held-out digits), fd_class (list over classes), fd_class_mean
    and accuracy (classifier argmax == label) to each row."""
    feat_heldout = classifier_features(clf, heldout)
    for r in rows:
        feat = r["features"] = classifier_features(clf, r["samples"])
        r["fd"] = frechet_distance(feat, feat_heldout)
        r["fd_class"] = [frechet_distance(feat[labels == c], feat_heldout[heldout_labels == c]) for c in range(NUM_CLASSES)]
        r["fd_class_mean"] = sum(r["fd_class"]) / NUM_CLASSES
        with torch.no_grad():
            r["accuracy"] = (clf.head(feat).argmax(1) == labels).double().mean().item()


COLUMNS = {
    "name": "setting id (also conditional_samples_<name>.png)",
    "run": "sampler and its number of steps on the full schedule",
    "variant": "full = every step; teleport = the first skipped_steps replaced by the closed-form jump along each "
               "sample's class Gaussian; teleport global = the same jump along the one Gaussian of all digits; "
               "fewer steps = full_steps - skipped_steps steps, no teleport; reference = not sampled",
    "skipped_steps": "steps of the full schedule not run by the network",
    "full_steps": "steps of the full schedule",
    "sigma_start": "noise level at which the network starts (80 = pure noise)",
    "nfe": "network evaluations per sample (the cost)",
    "fd": "Frechet distance of all samples to all held-out digits, classifier features (lower is better)",
    "fd_class_mean": "mean over the 10 classes of the per-class Frechet distance (lower is better)",
    "accuracy": "fraction of samples the classifier assigns to their label (higher is better)",
    "fd_vs_full_pct": "change of fd against the full run of the same sampler and steps, % (lower is better)",
    "fd_vs_full_sd": "standard deviation of fd_vs_full_pct over a paired bootstrap of the generated samples (same "
                     "resampled indices for every setting; held-out digits fixed)",
    **{f"fd_class_{c}": f"Frechet distance of the class-{c} samples to the class-{c} held-out digits (lower is better)"
       for c in range(NUM_CLASSES)},
}


def add_differences(rows, feat_heldout, resamples, seed):
    """fd_vs_full_pct and its paired-bootstrap sd (metrics.bootstrap_fd) for every sampled row."""
    sampled = [r for r in rows if r["variant"] in VARIANTS]
    for r in rows:
        r["fd_vs_full_pct"] = r["fd_vs_full_sd"] = ""
    boot = bootstrap_fd({r["name"]: r["features"] for r in sampled}, feat_heldout, resamples, seed) if (
        resamples >= 2 and sampled) else None
    for r in sampled:
        full = next(f for f in sampled if f["run"] == r["run"] and f["variant"] == "full")
        if r is not full:
            r["fd_vs_full_pct"] = 100 * (r["fd"] / full["fd"] - 1)
            if boot is not None:
                r["fd_vs_full_sd"] = (100 * (boot[r["name"]] / boot[full["name"]] - 1)).std().item()


def summarise(rows):
    from .demo import with_noise

    lines = [f"{r['run']}: {r['variant']}, skip {r['skipped_steps']}: FD all {with_noise(r['fd_vs_full_pct'], r['fd_vs_full_sd']).strip()} "
             "vs the full run" for r in rows if r.get("fd_vs_full_pct", "") != ""]
    if lines:
        lines.append("(±: paired-bootstrap sd over the generated samples; ~: within the noise, |dFD| < 2 sd)")
    return "\n".join(lines)


def format_table(rows, num_samples, heldout_counts):
    lines = [
        f"Class-conditional MNIST, {num_samples} samples per setting (label i % 10). FD: Frechet distance in the "
        "classifier's 128-d features, LOWER IS BETTER; acc: classifier accuracy against the labels, HIGHER IS BETTER.",
        f"  FD all: all samples vs the {sum(heldout_counts)} held-out digits; FD class: mean over classes of class-c "
        f"samples vs class-c held-out digits ({min(heldout_counts)}-{max(heldout_counts)} per class)",
        "  teleport: skipped steps replaced by the closed-form jump along each sample's class Gaussian; teleport global: "
        "along the one Gaussian of all digits; fewer steps: same NFE, no jump",
    ]
    head = (f"{'run':22s} {'setting':16s} {'skip':>5s} {'NFE':>4s} {'sigma0':>7s} {'FD all':>7s} {'FD class':>8s} "
            f"{'acc':>6s}  " + " ".join(f"{'FD' + str(c):>6s}" for c in range(NUM_CLASSES)))
    lines += [head, "-" * len(head)]
    previous = None
    for r in rows:
        run = r["run"] if r["run"] != previous else ""
        previous = r["run"]
        sampled = r["variant"] in VARIANTS
        skip = f"{r['skipped_steps']}/{r['full_steps']}" if sampled else ""
        nfe = f"{r['nfe']:4d}" if sampled else "   -"
        sigma0 = f"{r['sigma_start']:7.3g}" if sampled else "      -"
        lines.append(f"{run:22s} {r['variant']:16s} {skip:>5s} {nfe} {sigma0} {r['fd']:7.2f} {r['fd_class_mean']:8.2f} "
                     f"{r['accuracy']:6.3f}  " + " ".join(f"{v:6.1f}" for v in r["fd_class"]))
    return "\n".join(lines)


def main(args):
    """args: the parsed `demo` options with --conditional."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train, train_labels = mnist_split("train")
    heldout, heldout_labels = mnist_split("heldout")
    train, heldout = train.reshape(train.shape[0], -1), heldout.reshape(heldout.shape[0], -1)
    net, clf = load_denoiser(conditional=True), load_classifier()

    t0 = time.perf_counter()
    per_class = gk.GaussianMixture.fit_per_class(train, train_labels)
    global_gaussian = gk.GaussianModel.fit(train)
    print(f"fitted {per_class} (one component per class) and the global {global_gaussian} in "
          f"{time.perf_counter() - t0:.1f} s")

    labels = torch.arange(args.num_samples) % NUM_CLASSES
    noise = torch.randn(args.num_samples, train.shape[1], generator=torch.Generator().manual_seed(args.seed))
    rows, seconds_per_nfe = run_settings(args, net, per_class, global_gaussian, noise, labels)
    gen = torch.Generator().manual_seed(args.seed + 1)
    # the floor: training digits with the samples' labels (the first of each class in a fixed shuffle)
    order = torch.randperm(train.shape[0], generator=gen)
    by_class = [order[train_labels[order] == c] for c in range(NUM_CLASSES)]
    taken = [0] * NUM_CLASSES
    floor_rows = []
    for c in labels.tolist():
        floor_rows.append(by_class[c][taken[c] % by_class[c].numel()])
        taken[c] += 1
    for name, label, x in (
            ("training_data", "training digits (floor)", train[torch.stack(floor_rows)]),
            ("class_gaussian_samples", "class Gaussians alone", class_gaussian_samples(per_class, labels, gen).clamp(-1, 1)),
            ("global_gaussian_samples", "global Gaussian alone", global_gaussian.sample(args.num_samples, gen).clamp(-1, 1))):
        rows.append(dict(name=name, run="reference", sampler="", variant=label, skipped_steps=0, full_steps=0,
                         sigma_start=0.0, nfe=0, samples=x))
    evaluate(rows, clf, heldout, heldout_labels, labels)
    add_differences(rows, classifier_features(clf, heldout), args.bootstrap, args.seed)

    with open(args.out_dir / "conditional_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            flat = {**r, **{f"fd_class_{c}": v for c, v in enumerate(r["fd_class"])}}
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat.items() if k in COLUMNS})
    for r in rows:
        what = r["variant"] if r["run"] == "reference" else f"{r['run']}: {r['variant']}, skip {r['skipped_steps']}"
        save_grid(r["samples"], args.out_dir / f"conditional_samples_{r['name']}.png",
                  f"{what} (one class per column)\nFD {r['fd']:.2f} (lower is better), accuracy {r['accuracy']:.3f}",
                  n=NUM_CLASSES)
    counts = [int((heldout_labels == c).sum()) for c in range(NUM_CLASSES)]
    print(format_table(rows, args.num_samples, counts))
    print(summarise(rows))
    print(f"time: the network takes {seconds_per_nfe:.2f} s per NFE for {args.num_samples} samples "
          f"({torch.get_num_threads()} threads)")
    print(f"wrote {args.out_dir}/conditional_table.csv and conditional_samples_*.png")
    return 0
