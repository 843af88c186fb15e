// The r = 0 (isotropic / empirical "delta") mixture posterior on CPU: csrc/cpu/empirical.cpp.
#pragma once
#include <ATen/ATen.h>

namespace gsa::cpu {

// Fills den [B, D] (if need_denoised), logp [B] and weights [B, K] (if need_weights), allocated
// by the caller; arguments as mixture_posterior's, already checked, with no bases (r = 0).
void empirical_posterior_cpu(const at::Tensor& x, const at::Tensor& means,
                             const at::Tensor& residual_var, const at::Tensor& log_weights,
                             const at::Tensor& sigma, bool need_denoised, bool need_weights,
                             at::Tensor& den, at::Tensor& logp, at::Tensor& weights);

}  // namespace gsa::cpu
