"""The registry and backends layer under the public API (docs/architecture.md, section 5): the op
registry (_contract), argument preparation (_args), the backward rules (_autograd), the backend
table (_backends), the compiled extension's loader (_extension), the CPU layouts a model keeps
(_layouts) and the statistics file format (_format). Private: the public names are gsa_kernels'."""
