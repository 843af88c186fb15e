// Argument validation shared by the torch bindings of every compiled backend (CPU, CUDA,
// emulated CUDA). Host-only: includes torch headers, so never include it from kernel files.
// Every binding calls these before touching memory. Shape/dtype/device errors raise
// ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace gsa {

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [B, D], got ", x.sizes());
  auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   op, ": x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
}

// A model / parameter tensor: given rank, compute dtype, x's device, contiguous.
inline void check_param(const at::Tensor& x, const at::Tensor& p, const char* name, int64_t dim,
                        const char* op) {
  TORCH_CHECK_VALUE(p.dim() == dim, op, ": ", name, " must have ", dim, " dims, got ", p.sizes());
  TORCH_CHECK_TYPE(p.scalar_type() == compute_dtype(x), op, ": ", name, " must be ",
                   compute_dtype(x), " for x of dtype ", x.scalar_type(), ", got ",
                   p.scalar_type());
  TORCH_CHECK_VALUE(p.device() == x.device(), op, ": ", name, " is on ", p.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(p.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_gaussian(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                           const at::Tensor& eigvals, double residual_var, const char* op) {
  check_x(x, op);
  check_param(x, mean, "mean", 1, op);
  check_param(x, basis, "basis", 2, op);
  check_param(x, eigvals, "eigvals", 1, op);
  const int64_t D = x.size(1);
  TORCH_CHECK_VALUE(mean.size(0) == D, op, ": mean has ", mean.size(0), " entries, x has D = ", D);
  TORCH_CHECK_VALUE(basis.size(0) == D, op, ": basis must be [D, r] with D = ", D, ", got ",
                    basis.sizes());
  TORCH_CHECK_VALUE(eigvals.size(0) == basis.size(1), op, ": eigvals has ", eigvals.size(0),
                    " entries, basis has r = ", basis.size(1));
  TORCH_CHECK_VALUE(std::isfinite(residual_var) && residual_var >= 0, op,
                    ": residual_var must be finite and >= 0, got ", residual_var);
}

// A per-row tensor (sigma, scale): [B] (or [T, B] for trajectories), compute dtype.
inline void check_rows(const at::Tensor& x, const at::Tensor& v, const char* name,
                       at::IntArrayRef shape, const char* op) {
  check_param(x, v, name, static_cast<int64_t>(shape.size()), op);
  TORCH_CHECK_VALUE(v.sizes() == shape, op, ": ", name, " must be ", shape, ", got ", v.sizes());
}

// K stacked low-rank Gaussians (a mixture's components, or the labelled ops' per-label ones):
// means [K, D], bases [K, D, r], eigvals [K, r], residual_var [K], K > 0.
inline void check_components(const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
                             const at::Tensor& eigvals, const at::Tensor& residual_var, const char* op) {
  check_x(x, op);
  check_param(x, means, "means", 2, op);
  check_param(x, bases, "bases", 3, op);
  check_param(x, eigvals, "eigvals", 2, op);
  check_param(x, residual_var, "residual_var", 1, op);
  const int64_t K = means.size(0), D = x.size(1), r = bases.size(2);
  TORCH_CHECK_VALUE(K > 0, op, ": the mixture has no components");
  TORCH_CHECK_VALUE(means.size(1) == D, op, ": means must be [K, D] with D = ", D, ", got ",
                    means.sizes());
  TORCH_CHECK_VALUE(bases.size(0) == K && bases.size(1) == D, op, ": bases must be [K, D, r], got ",
                    bases.sizes());
  TORCH_CHECK_VALUE(eigvals.size(0) == K && eigvals.size(1) == r, op,
                    ": eigvals must be [K, r], got ", eigvals.sizes());
  TORCH_CHECK_VALUE(residual_var.size(0) == K, op, ": residual_var must be [K], got ",
                    residual_var.sizes());
}

inline void check_mixture(const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
                          const at::Tensor& eigvals, const at::Tensor& residual_var,
                          const at::Tensor& log_weights, const at::Tensor& sigma, const char* op) {
  check_components(x, means, bases, eigvals, residual_var, op);
  check_param(x, log_weights, "log_weights", 1, op);
  TORCH_CHECK_VALUE(log_weights.size(0) == means.size(0), op, ": log_weights must be [K], got ",
                    log_weights.sizes());
  check_rows(x, sigma, "sigma", {x.size(0)}, op);
}

// The labelled Gaussian ops: x, labels int64 [B], and one Gaussian per label (check_components).
// Label values are read only on the CPU (one pass over B integers); a CUDA binding checks them on
// the device instead.
inline void check_labeled(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                          const at::Tensor& bases, const at::Tensor& eigvals,
                          const at::Tensor& residual_var, const char* op) {
  check_components(x, means, bases, eigvals, residual_var, op);
  const int64_t B = x.size(0), K = means.size(0);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, op, ": labels must be [B] = [", B,
                    "], got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == x.device(), op, ": labels is on ", labels.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(labels.is_contiguous(), op, ": labels must be contiguous");
  if (labels.device().is_cpu()) {
    const int64_t* l = labels.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(l[b] >= 0 && l[b] < K, op, ": labels must lie in [0, K) = [0, ", K,
                        "), got ", l[b], " at row ", b);
  }
}

}  // namespace gsa
