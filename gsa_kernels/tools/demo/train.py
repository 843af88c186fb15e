"""`python -m gsa_kernels train-demo-model`: train the demo's denoiser network and feature
classifier on the MNIST-5k training split with fixed seeds, and write both (EMA weights for the
denoiser) as safetensors into gsa_kernels/assets/, with the command, wall time and final losses
in the files' metadata.

`--conditional`: the class-conditional denoiser instead (`demo --conditional`), initialised from
the committed unconditional network with a zero class embedding (so it starts as that network
and only has to learn what the class adds: a short run fits a 2-core budget); the classifier is
not retrained."""
import copy
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from .classifier import CLASSIFIER_FILE, Classifier
from .cli import train_parser
from .data import mnist_split
from .net import CONDITIONAL_DENOISER_FILE, DENOISER_FILE, NUM_CLASSES, EDMDenoiser, load_denoiser

CONDITIONAL_STEPS, CONDITIONAL_LR = 2000, 1e-3  # the --conditional defaults (fine-tuning)


def _save(model, path, meta):
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in meta.items()})


def _random_shift(x, g, max_shift=2):
    """Translate each image by up to max_shift pixels (background -1 fills the border)."""
    B = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=g)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(B)])


def train_classifier(epochs, batch_size, seed, log=print):
    """Adam, cross-entropy, random shifts; returns (model in eval mode, held-out accuracy, final loss)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = mnist_split("train")
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        clf.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(_random_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = classifier_accuracy(clf)
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    return clf.eval(), classifier_accuracy(clf), loss.item()


@torch.no_grad()
def classifier_accuracy(clf):
    clf.eval()
    x, y = mnist_split("heldout")
    return (clf(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def heldout_denoiser_loss(net, seed=1234):
    """The EDM loss on the held-out split with fixed noise (comparable across runs); a
    conditional network gets the digits' labels."""
    x, y = mnist_split("heldout")
    labels = y if net.num_classes else None
    return net.eval().loss(x, generator=torch.Generator().manual_seed(seed), labels=labels).item()


def train_denoiser(steps, batch_size, lr, ema_decay, seed, conditional=False, log=print):
    """EDM loss, Adam with cosine learning-rate decay, EMA of the weights; returns (EMA model,
    mean training loss over the last 10 % of steps, held-out loss of the EMA model).
    conditional: the class-conditional network, started from the committed unconditional one."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = mnist_split("train")
    if conditional:
        net = EDMDenoiser(num_classes=NUM_CLASSES)
        missing, unexpected = net.load_state_dict(load_denoiser().state_dict(), strict=False)
        assert missing == ["net.class_embed.weight"] and not unexpected, (missing, unexpected)
    else:
        net = EDMDenoiser()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    tail = []
    bar = tqdm(range(steps), desc="denoiser", mininterval=10, file=sys.stdout)
    for step in bar:
        net.train()
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        loss = net.loss(x[idx], generator=g, labels=y[idx] if conditional else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if (step + 1) % 500 == 0:
            bar.write(f"step {step + 1}: loss {loss.item():.4f}")
    return ema.eval(), sum(tail) / len(tail), heldout_denoiser_loss(ema)


def main(argv=None):
    p = train_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m gsa_kernels train-demo-model " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {}
    if args.conditional:
        if args.only == "classifier":
            p.error("--conditional trains the conditional denoiser only (the demo reuses the committed classifier)")
        args.only = "denoiser"
        args.steps = CONDITIONAL_STEPS if args.steps is None else args.steps
        args.lr = CONDITIONAL_LR if args.lr is None else args.lr
    args.steps = 5000 if args.steps is None else args.steps
    args.lr = 2e-3 if args.lr is None else args.lr
    if args.only in ("both", "classifier"):
        t0 = time.time()
        clf, acc, loss = train_classifier(args.classifier_epochs, args.batch_size, args.seed)
        meta = {"command": command.strip(), "wall_time_s": round(time.time() - t0, 1), "final_train_loss": round(loss, 5),
                "heldout_accuracy": round(acc, 4), "seed": args.seed, "epochs": args.classifier_epochs}
        _save(clf, args.out_dir / CLASSIFIER_FILE, meta)
        summary["classifier"] = meta
    if args.only in ("both", "denoiser"):
        t0 = time.time()
        net, tail_loss, heldout = train_denoiser(args.steps, args.batch_size, args.lr, args.ema, args.seed,
                                                 conditional=args.conditional)
        meta = {"command": command.strip(), "wall_time_s": round(time.time() - t0, 1), "final_train_loss": round(tail_loss, 5),
                "heldout_loss_ema": round(heldout, 5), "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "ema": args.ema, "threads": args.threads}
        if args.conditional:
            meta["initialised_from"] = DENOISER_FILE
        _save(net, args.out_dir / (CONDITIONAL_DENOISER_FILE if args.conditional else DENOISER_FILE), meta)
        summary["denoiser"] = meta
    print(json.dumps(summary, indent=2))
    return 0
