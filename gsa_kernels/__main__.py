"""python -m gsa_kernels {info, demo, explain, train-demo-model, bench} [options]

Sub-commands other than `info` hand their remaining arguments to the `main(argv)` of the module
that implements them (`python -m gsa_kernels demo --help` lists a sub-command's options).
"""
import argparse
import importlib
import sys

COMMANDS = {  # name -> (module, help)
    "demo": ("gsa_kernels.demo.demo", "MNIST teleportation demo: samples, Frechet distances, plots"),
    "explain": ("gsa_kernels.demo.explain", "variance of the network denoiser explained by Gaussian / mixture / delta models"),
    "train-demo-model": ("gsa_kernels.demo.train", "train the demo's denoiser network and classifier (fixed seed)"),
    "bench": ("gsa_kernels.bench", "CPU backend vs eager reference vs torch.compile vs roofline, as a table"),
}


def info():
    import torch

    import gsa_kernels as gk
    from gsa_kernels import _backends, _extension

    print(f"gsa_kernels {gk.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as e:
        print(f"triton: not importable ({type(e).__name__}: {e})")
    print(f"compiled extension: {'loaded' if _extension.loaded else 'not loaded: ' + str(_extension.error)}")
    for name, (ok, why) in _backends.status().items():
        print(f"  {name:10s} {'available  ' if ok else 'unavailable'}  {why}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m gsa_kernels", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["info", *COMMANDS], help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args, rest = p.parse_known_args(argv[:1])
    if args.command == "info":
        return info()
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
