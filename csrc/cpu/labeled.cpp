// CPU kernels of the labelled Gaussian ops (class-conditional models): row b is mapped under
// component labels[b] of stacked Gaussians. The rows are grouped by label (a counting sort over
// B), and each group is one call of the single-Gaussian CPU kernel (gaussian.cpp, reached through
// the dispatcher), so a group runs exactly the single-Gaussian path, GEMMs over all its rows:
//   - a group whose rows are contiguous in x (labels sorted, or all equal) is a view of x and its
//     output is copied into place; otherwise its rows are gathered and scattered back;
//   - empty groups cost nothing; groups run one after the other, each threaded inside (row
//     blocks and GEMMs), so every group uses every core.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"
#include "gsa/checks.h"
#include "gsa/spectral.h"

namespace gsa::cpu {
namespace {

// The rows of each label: order[begin[k] .. begin[k + 1]) are the rows with label k, in order.
struct Groups {
  std::vector<int64_t> begin;  // [K + 1]
  at::Tensor order;            // int64 [B]
  bool sorted;                 // labels non-decreasing: group k is rows begin[k] .. begin[k + 1]
};

Groups group_rows(const at::Tensor& labels, int64_t K) {
  const int64_t B = labels.size(0);
  const int64_t* l = labels.data_ptr<int64_t>();
  Groups g{std::vector<int64_t>(K + 1, 0), at::empty({B}, labels.options()), true};
  for (int64_t b = 0; b < B; ++b) {
    ++g.begin[l[b] + 1];
    if (b > 0 && l[b] < l[b - 1]) g.sorted = false;
  }
  for (int64_t k = 0; k < K; ++k) g.begin[k + 1] += g.begin[k];
  std::vector<int64_t> next(g.begin.begin(), g.begin.end() - 1);
  int64_t* order = g.order.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) order[next[l[b]]++] = b;
  return g;
}

using MapFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                         const std::optional<at::Tensor>&);
using TrajectoryFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                const at::Tensor&, const std::optional<at::Tensor>&);

// Runs group(k, rows, first) for every non-empty label k: rows are x's row indices (int64), first
// the first row when the group's rows are contiguous (else -1).
template <typename F>
void for_each_group(const Groups& g, int64_t K, F&& group) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = g.begin[k + 1] - g.begin[k];
    if (n == 0) continue;
    group(k, g.order.narrow(0, g.begin[k], n), g.sorted ? g.begin[k] : int64_t(-1));
  }
}

// Component k's residual_var as the single-Gaussian kernels take it (a double holds it exactly).
double residual_of(const at::Tensor& residual_var, int64_t k) {
  return residual_var.scalar_type() == at::kDouble ? residual_var.data_ptr<double>()[k]
                                                   : double(residual_var.data_ptr<float>()[k]);
}

at::Tensor gaussian_map_labeled_cpu(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                    const at::Tensor& bases, const at::Tensor& eigvals,
                                    const at::Tensor& residual_var, const at::Tensor& sigma_from,
                                    const at::Tensor& sigma_to, const at::Tensor& scale_from,
                                    const at::Tensor& scale_to, int64_t kind) {
  const char* op = "gsa_kernels::gaussian_map_labeled (cpu)";
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  check_labeled(x, labels, means, bases, eigvals, residual_var, op);
  const int64_t B = x.size(0), K = means.size(0);
  for (auto [t, name] : {std::pair{&sigma_from, "sigma_from"}, {&sigma_to, "sigma_to"},
                         {&scale_from, "scale_from"}, {&scale_to, "scale_to"}})
    check_rows(x, *t, name, {B}, op);
  static const auto map = c10::Dispatcher::singleton().findSchemaOrThrow("gsa_kernels::gaussian_map", "").typed<MapFn>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the groups' calls are kernel internals
  const Groups g = group_rows(labels, K);
  at::Tensor out;
  for_each_group(g, K, [&](int64_t k, const at::Tensor& rows, int64_t first) {
    const int64_t n = rows.size(0);
    auto part = [&](const at::Tensor& t) { return first >= 0 ? t.narrow(0, first, n) : t.index_select(0, rows); };
    at::Tensor o = map.call(part(x), means[k], bases[k], eigvals[k], residual_of(residual_var, k), part(sigma_from),
                            part(sigma_to), part(scale_from), part(scale_to), kind, std::nullopt);
    if (n == B) {  // one label: the single-Gaussian kernel's output is the output
      out = o;
      return;
    }
    if (!out.defined()) out = empty_output(x.sizes(), x.options());
    if (first >= 0) out.narrow(0, first, n).copy_(o);
    else out.index_copy_(0, rows, o);
  });
  return out.defined() ? out : empty_output(x.sizes(), x.options());
}

at::Tensor gaussian_trajectory_labeled_cpu(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                           const at::Tensor& bases, const at::Tensor& eigvals,
                                           const at::Tensor& residual_var, const at::Tensor& sigmas) {
  const char* op = "gsa_kernels::gaussian_trajectory_labeled (cpu)";
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  check_labeled(x, labels, means, bases, eigvals, residual_var, op);
  const int64_t B = x.size(0), K = means.size(0);
  check_param(x, sigmas, "sigmas", 2, op);
  TORCH_CHECK_VALUE(sigmas.size(1) == B, op, ": sigmas must be [T, B] with B = ", B, ", got ", sigmas.sizes());
  static const auto trajectory =
      c10::Dispatcher::singleton().findSchemaOrThrow("gsa_kernels::gaussian_trajectory", "").typed<TrajectoryFn>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Groups g = group_rows(labels, K);
  at::Tensor out;
  for_each_group(g, K, [&](int64_t k, const at::Tensor& rows, int64_t first) {
    const int64_t n = rows.size(0);
    const at::Tensor xs = first >= 0 ? x.narrow(0, first, n) : x.index_select(0, rows);
    const at::Tensor ss = first >= 0 ? sigmas.narrow(1, first, n).contiguous() : sigmas.index_select(1, rows);
    at::Tensor o = trajectory.call(xs, means[k], bases[k], eigvals[k], residual_of(residual_var, k), ss, std::nullopt);
    if (n == B) {
      out = o;
      return;
    }
    if (!out.defined()) out = empty_output({sigmas.size(0), B, x.size(1)}, x.options());
    if (first >= 0) out.narrow(1, first, n).copy_(o);
    else out.index_copy_(1, rows, o);
  });
  return out.defined() ? out : empty_output({sigmas.size(0), B, x.size(1)}, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("gaussian_map_labeled", &gaussian_map_labeled_cpu);
  m.impl("gaussian_trajectory_labeled", &gaussian_trajectory_labeled_cpu);
}

}  // namespace gsa::cpu
