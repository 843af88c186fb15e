"""python -m gsa_kernels {info}"""
import argparse
import sys


def info(_args=None):
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gsa_kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and available backends").set_defaults(func=info)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
