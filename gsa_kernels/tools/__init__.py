"""The tools that merely use the library, behind `python -m gsa_kernels bench | fit | demo |
explain | ...`: the bench harness (bench), the statistics fitter (fit_cli) and the MNIST demo
(demo/). Nothing in the library imports them."""
