"""Scale-out internals (docs/architecture.md, sections 7 and 9): mergeable partial posteriors
(partial; gk.mixture_partial, gk.merge_partials) and file-backed mixtures (streamed;
GaussianMixture.from_points of a path). gsa_kernels.distributed builds on both."""
