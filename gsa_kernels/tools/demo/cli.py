"""Command-line options of `demo`, `explain`, `train-demo-model` and `bench`, defined without
importing torch so that `python -m gsa_kernels <command> --help` answers at once."""
import argparse
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"  # committed weights

# The default demo: a standard 18-step Heun run and the low-NFE regime, where skipping steps
# with the closed-form jump should pay most (SAMPLER:STEPS:SKIP-FRACTIONS).
DEFAULT_RUNS = ["heun:18:0.2,0.4", "heun:8:0.25", "dpmpp_2m:10:0.2"]
QUICK_RUNS = ["heun:6:0.34", "dpmpp_2m:5:0.2"]
# --conditional: the standard Heun run, teleporting 10-40 % of it
CONDITIONAL_RUNS = ["heun:18:0.1,0.2,0.3,0.4"]
QUICK_CONDITIONAL_RUNS = ["heun:4:0.25"]
SAMPLERS = ("heun", "dpmpp_2m")


def _parser(prog, description):
    return argparse.ArgumentParser(prog=f"python -m gsa_kernels {prog}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def at_least(lo):
    """argparse type: an int >= lo (a usage error, not a traceback, for --batch-size 0 and the like)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    parse.__name__ = f"int >= {lo}"
    return parse


def nonempty_list(text):
    """A comma-separated list with at least one name (kept as the text)."""
    if not [w for w in text.split(",") if w.strip()]:
        raise argparse.ArgumentTypeError("needs at least one comma-separated name")
    return text


def run_spec(text):
    """'heun:18:0.2,0.4' -> ('heun', 18, [0.2, 0.4])."""
    try:
        sampler, steps, fractions = text.split(":")
        steps, fractions = int(steps), [float(f) for f in fractions.split(",") if f]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SAMPLER:STEPS:FRACTIONS, e.g. heun:18:0.2,0.4") from None
    if sampler not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if steps < 2 or not fractions or any(not 0 < f < 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"{text!r}: STEPS must be >= 2 and each fraction in (0, 1)")
    return sampler, steps, fractions


def demo_parser():
    p = _parser("demo", "MNIST: the committed EDM network sampled from fixed seeds with the full schedule, with its "
                "first steps replaced by one closed-form Gaussian jump (teleport), and at the same number of network "
                "evaluations without the jump (fewer steps; truncated schedule). Quality: Frechet distance to the "
                "held-out digits (lower is better). Writes a table, sample grids and a figure.")
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--num-samples", type=at_least(2), default=None, help="samples per setting (None: 500; --quick: 48, "
                   "or 40 with --conditional)")
    p.add_argument("--runs", type=run_spec, nargs="+", default=None, metavar="SAMPLER:STEPS:FRACTIONS",
                   help=f"sampler ({' or '.join(SAMPLERS)}), its steps on the full schedule, and the fractions of those "
                        f"steps to skip; None: {' '.join(DEFAULT_RUNS)}, or {' '.join(CONDITIONAL_RUNS)} with "
                        "--conditional")
    p.add_argument("--mixture-components", type=at_least(1), default=10, help="components of the fitted Gaussian mixture "
                   "(a reference row: samples of the mixture alone)")
    p.add_argument("--mixture-rank", type=at_least(1), default=128, help="principal directions per mixture component")
    p.add_argument("--bootstrap", type=at_least(0), default=None,
                   help="resamples of the paired bootstrap that gives each dFD its uncertainty (None: 100; --quick: "
                        "20; 0: none)")
    p.add_argument("--no-baselines", action="store_true", help="skip the equal-NFE baselines without teleportation")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every setting)")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="network batch size (None: --num-samples, at "
                   "most 500)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional demo: the committed conditional network, teleported along each sample's "
                        "class Gaussian vs the global Gaussian; per-class Frechet distances and classifier accuracy")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test, not a result: 48 samples, runs {' '.join(QUICK_RUNS)} (--conditional: 40 samples, "
                        f"{' '.join(QUICK_CONDITIONAL_RUNS)}), 20 bootstrap resamples; explicit options win")
    return p


def explain_parser():
    p = _parser("explain", "Fraction of the demo network's denoiser variance explained by the Gaussian, the "
                "10-mode mixture and the training-set delta mixture, across sigma in [0.002, 80].")
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--num-samples", type=at_least(2), default=None, help="digits per split (None: 500; --quick: 32)")
    p.add_argument("--num-sigmas", type=at_least(2), default=None, help="log-spaced noise levels in [0.002, 80] "
                   "(None: 17; --quick: 4)")
    p.add_argument("--splits", nargs="+", choices=("heldout", "train"), default=None,
                   help="digits to noise: held-out and/or training split (None: both; --quick: heldout)")
    p.add_argument("--mixture-components", type=at_least(1), default=10, help="components of the fitted Gaussian mixture")
    p.add_argument("--mixture-rank", type=at_least(1), default=128, help="principal directions per mixture component")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise eps (and the digit subset)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke test, not a result: 32 digits, 4 noise levels, held-out "
                   "split (with --local: tiny sizes, see below); explicit options win")
    local = p.add_argument_group("--local: the local score machines (LS, ELS, BB-ELS; Kamb & Ganguli 2025) against "
                                 "the network, patch size calibrated per sigma of the sampler's schedule")
    local.add_argument("--local", action="store_true", help="run the local-machine analysis instead")
    local.add_argument("--num-train", type=at_least(1), default=None, help="training digits of the local machines "
                       "(None: 100; --quick: 16)")
    local.add_argument("--patch-sizes", type=at_least(1), nargs="+", default=None,
                       help="odd patch sizes the calibration chooses from (None: 1 3 ... 15; --quick: 1 3 5)")
    local.add_argument("--steps", type=at_least(1), default=None, help="Heun steps of the Karras schedule, whose "
                       "sigmas are the calibration grid (None: 6; --quick: 3)")
    local.add_argument("--num-paths", type=at_least(1), default=None, help="initial noises of the case-by-case test "
                       "(None: 100; --quick: 4)")
    local.add_argument("--calib-digits", type=at_least(1), default=None, help="held-out digits that calibrate the "
                       "patch size (None: 8; --quick: 4)")
    local.add_argument("--local-digits", type=at_least(2), default=None, help="other held-out digits the r^2 table "
                       "is reported on (None: 16; --quick: 8)")
    local.add_argument("--backend", default=None, help="backend of the local machines (None: auto; --quick: cpu)")
    return p


def train_parser():
    p = _parser("train-demo-model", "Train the MNIST demo's denoiser and classifier (fixed seeds) into "
                "gsa_kernels/assets/.")
    p.add_argument("--steps", type=at_least(1), default=None, help="denoiser optimisation steps (None: 5000, or 2000 with "
                   "--conditional)")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="training batch size (denoiser and classifier)")
    p.add_argument("--lr", type=float, default=None, help="denoiser peak learning rate, cosine decay (None: 2e-3, "
                   "or 1e-3 with --conditional)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved denoiser weights")
    p.add_argument("--classifier-epochs", type=at_least(0), default=15, help="classifier training epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads (1 = deterministic and fastest on a "
                   "shared machine)")
    p.add_argument("--only", choices=("both", "denoiser", "classifier"), default="both", help="which model to train")
    p.add_argument("--conditional", action="store_true", help="train the class-conditional denoiser of `demo "
                   "--conditional` instead, starting from the committed unconditional one (the classifier is reused)")
    p.add_argument("--out-dir", type=Path, default=ASSETS_DIR, help="where the safetensors files go")
    return p


BENCH_WORKLOADS = ("G1", "G2", "T1", "M1", "E1")  # gsa_kernels/tools/bench.py defines them
# bench.py's groups of named workloads: the MNIST empirical posterior by sigma (MN), M1 by sigma
# decade (M1S), few-query sampling (F); E2 (the empirical sweep) and L (local score machines) on request
BENCH_DEFAULT = BENCH_WORKLOADS + ("MN", "M1S", "F")
BENCH_IMPLS = ("cpu", "reference", "compiled")  # plus "roofline", computed not run


def bench_parser():
    p = _parser("bench", "CPU backend vs eager reference vs torch.compile vs this machine's roofline, one "
                "table (medians; peaks measured next to each workload).")
    p.add_argument("--workloads", type=nonempty_list, default=",".join(BENCH_DEFAULT),
                   help="comma-separated subset of " + ",".join(BENCH_DEFAULT)
                   + " (MN, M1S, F: groups), E2 (the empirical sweep), L (local score machines) or "
                   "E2-/MN-/F-/M1-s/L- names")
    p.add_argument("--impls", type=nonempty_list, default=",".join(BENCH_IMPLS), help="comma-separated subset of " + ",".join(BENCH_IMPLS))
    p.add_argument("--backend", default="cpu", help="gsa_kernels backend timed in the 'cpu' column")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed runs per implementation (median)")
    p.add_argument("--plot", default=None, help="write time vs N and vs sigma of the E2 workloads to this image")
    return p
