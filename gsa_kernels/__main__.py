"""python -m gsa_kernels {info, fit, demo, explain, train-demo-model, bench} [options]

The command line is parsed before torch is imported, so `--help` answers at once.
"""
import argparse
import importlib
import logging
import sys

COMMANDS = {  # name -> (module, help)
    "info": ("gsa_kernels.__main__", "versions, and which backends are usable here and why the others are not"),
    "fit": ("gsa_kernels.tools.fit_cli", "fit teleport statistics (Gaussian, per class, mixture) from an image folder, .npy or "
                                   ".safetensors, streamed, into a .safetensors file"),
    "demo": ("gsa_kernels.tools.demo.demo", "MNIST teleportation demo: samples, Frechet distances (lower is better), plots"),
    "explain": ("gsa_kernels.tools.demo.explain", "variance of the network denoiser explained by Gaussian / mixture / delta "
                                            "models"),
    "train-demo-model": ("gsa_kernels.tools.demo.train", "train the demo's denoiser network and classifier (fixed seed)"),
    "bench": ("gsa_kernels.tools.bench", "CPU backend vs eager reference vs torch.compile vs roofline, as a table"),
}


def info():
    import torch

    import gsa_kernels as gk
    from gsa_kernels._core import _backends, _extension

    print(f"gsa_kernels {gk.__version__}")
    gpu = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build: no CUDA kernels"
    print(f"torch {torch.__version__} ({build}; GPU visible: {gpu})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as e:
        print(f"triton: not importable ({type(e).__name__}: {e})")
    print(f"compiled extension: {'loaded' if _extension.loaded else 'not loaded: ' + str(_extension.error)}")
    built = _extension.build_info()
    if built is not None:
        print(f"  built for torch {built.get('torch')} ({built.get('variant')}); this torch {torch.__version__}"
              + (": MISMATCH, rebuild: " + _extension.REBUILD if _extension.mismatch(built) else ""))
    for name, (ok, why) in _backends.status().items():
        print(f"  {name:10s} {'available  ' if ok else 'unavailable'}  {why}")
    return 0


class _NoCudaRuntimeNote(logging.Filter):
    """torch.utils.cpp_extension (imported by torch.compile) warns "No CUDA runtime is found"
    on every machine without a GPU; that is expected here and says nothing about gsa_kernels."""

    def filter(self, record):
        return not record.getMessage().startswith("No CUDA runtime is found")


def _parser():
    p = argparse.ArgumentParser(prog="python -m gsa_kernels", description="gsa_kernels: Gaussian score-field kernels, "
                                "the MNIST teleportation demo and benchmarks.",
                                epilog="`python -m gsa_kernels <command> --help` lists a command's options and defaults.")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # each command parses its own options
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    if not argv or argv[0].startswith("-"):
        p.parse_args(argv)  # --help, or an error naming the commands
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        p.parse_args([command])  # argparse's "invalid choice" error
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNote())
    if command == "info":
        argparse.ArgumentParser(prog="python -m gsa_kernels info", description=COMMANDS["info"][1]).parse_args(rest)
        return info()
    if command == "fit":
        from gsa_kernels.tools import fit_cli

        fit_cli.parser().parse_args(rest)
        return fit_cli.main(rest)
    from gsa_kernels.tools.demo import cli  # every command's options are defined without torch: parse them first

    parser = {"demo": cli.demo_parser, "explain": cli.explain_parser, "train-demo-model": cli.train_parser,
              "bench": cli.bench_parser}[command]
    parser().parse_args(rest)
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
