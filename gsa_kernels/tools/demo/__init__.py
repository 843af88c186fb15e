"""The MNIST teleportation demo: data, a small EDM denoiser network, a feature classifier,
training, Frechet metrics, the demo (`python -m gsa_kernels demo`) and the explained-variance
analysis (`python -m gsa_kernels explain`). Needs the `demo` extra (mlxtend, matplotlib)."""
