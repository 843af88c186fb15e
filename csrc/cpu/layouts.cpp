// The layout ops behind gsa_kernels/_core/_layouts.py: a model keeps GEMM-ready layouts of its tensors
// (basis_rows here, mixture_panels in mixture.cpp) and a content hash of the tensors they were
// built from; before each call it hashes its tensors again and rebuilds the layouts if the hash
// changed. Writes through any route (.data, numpy, dlpack, storage) change the contents and so
// are seen, which version counters and data pointers cannot promise.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "isa.h"

namespace gsa::cpu {
namespace {

constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ULL;  // xxHash64's primes and round
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kPrime3 = 0x165667B19E3779F9ULL;

inline uint64_t rotl(uint64_t v, int s) { return (v << s) | (v >> (64 - s)); }
inline uint64_t round64(uint64_t acc, uint64_t w) { return rotl(acc + w * kPrime2, 31) * kPrime1; }
inline uint64_t avalanche(uint64_t h) {
  h ^= h >> 33; h *= kPrime2; h ^= h >> 29; h *= kPrime3; return h ^ (h >> 32);
}

// Hash of n bytes (a chunk of the tensor), fast enough to run at memory speed: 8 lanes of 64 bits
// (one AVX-512 register, or two AVX2 / four SSE2 ones: the same bits on every ISA), each 64-byte
// stripe mixed as XXH3 does, acc += lo32(v ^ key) * hi32(v ^ key) + v (one widening multiply per
// lane, no multiply-latency chain across lanes), with a key that advances per stripe so that
// moving data between stripes (reordered rows) changes the hash. Seeded by the chunk index.
using U64x8 = uint64_t __attribute__((vector_size(64)));

uint64_t hash_chunk(const unsigned char* p, int64_t n, uint64_t seed) {
  U64x8 acc, key;
  for (int j = 0; j < 8; ++j) {
    acc[j] = seed + kPrime1 * (j + 1);
    key[j] = kPrime2 * (2 * j + 1);
  }
  int64_t i = 0;
  with_isa([&] {
    for (; i + 64 <= n; i += 64) {
      U64x8 v;
      std::memcpy(&v, p + i, sizeof v);
      const U64x8 k = v ^ key;
      acc += (k & 0xFFFFFFFFULL) * (k >> 32) + v;
      key += kPrime3;
    }
  });
  uint64_t h = seed;
  for (int j = 0; j < 8; ++j) h = round64(h, acc[j]);
  for (; i < n; ++i) h = round64(h, p[i]);
  return avalanche(h ^ static_cast<uint64_t>(n));
}

// A 64-bit hash of a CPU tensor's dtype, sizes and bytes (in its contiguous order). Chunks of
// 1 MiB are hashed in parallel and folded in order.
int64_t content_hash(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "gsa_kernels::content_hash: expected a CPU tensor, got ",
                    t.device());
  // a tensor whose storage was freed or shrunk (untyped_storage().resize_(0), the FSDP idiom)
  // keeps its sizes; t.contiguous() would return it and the loop below read freed memory
  const int64_t needed = t.numel() == 0 ? 0 : (t.storage_offset() + t.numel()) * t.element_size();
  TORCH_CHECK_VALUE(t.numel() == 0 || (t.has_storage() && t.storage().data() != nullptr &&
                                        static_cast<int64_t>(t.storage().nbytes()) >= needed),
                    "gsa_kernels::content_hash: the tensor's storage holds ",
                    t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0, " bytes but its ", t.numel(),
                    " elements need ", needed, " (freed or resized, e.g. untyped_storage().resize_(0))");
  const at::Tensor c = t.contiguous();
  const auto* p = static_cast<const unsigned char*>(c.data_ptr());
  const int64_t nbytes = c.numel() * c.element_size();
  constexpr int64_t kChunk = int64_t(1) << 20;
  const int64_t chunks = (nbytes + kChunk - 1) / kChunk;
  std::vector<uint64_t> h(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t i = c0; i < c1; ++i)
      h[i] = hash_chunk(p + i * kChunk, std::min(kChunk, nbytes - i * kChunk), static_cast<uint64_t>(i));
  });
  uint64_t out = round64(kPrime3, static_cast<uint64_t>(c.scalar_type()));
  for (int64_t s : c.sizes()) out = round64(out, static_cast<uint64_t>(s));
  for (uint64_t v : h) out = round64(out, v);
  return static_cast<int64_t>(avalanche(out));
}

// Whether keeping basis_rows (U^T) pays for the project GEMM c = x U of B rows. Without it the
// kernels multiply by U as it is (at::mm, no copy); with it the GEMM may run on an engine that
// needs contiguous rows of U^T (oneDNN), but the model hashes U on every call to keep it valid
// (one read of U at memory speed: with a full-rank basis and a small batch, a tenth of the GEMM).
// So: keep it when B (ms per row with the layout) + (ms of the hash) < B (ms per row without).
// The three costs are measured on first use per (dtype, threads, D, r and B rounded to powers of
// two; the GEMMs timed on that many rows, at most kLayoutRowsMax) and kept for the process, as
// the GEMM engines are (gemm.cpp): no host is assumed.
// The hash is charged at kHashRisk times its measured cost: it reads memory, whose bandwidth a
// shared host's neighbours take (the same 37.7 MB hash took 1.2 to 3.1 ms on one VM in one day,
// against a best-of-3 measured once), while the GEMMs it would speed up run from cache. Where the
// layout saves less than that, both routes cost about the same and the one without a hash (and
// without a second copy of U) is the safer.
constexpr double kHashRisk = 2.0;
constexpr int64_t kLayoutRowsMax = 256;

struct LayoutCosts {
  double rows_ms_per_row, direct_ms_per_row, hash_ms_per_byte;
};

// m: the rows to time the GEMMs on, the batch's class (a GEMM's cost per row falls with its rows:
// 64 rows of a 3072 x 3072 basis showed MKL 7 % behind oneDNN, 256 rows 1 %)
LayoutCosts measure_layout_costs(const at::Tensor& basis, int64_t m) {
  const int64_t D = basis.size(0);
  const at::Tensor x = at::randn({m, D}, basis.options());
  const at::Tensor rows = basis_rows(basis);
  LayoutCosts c;
  c.rows_ms_per_row = gemm_best_ms_per_row(x, rows);
  c.direct_ms_per_row = gemm_best_ms_per_row(x, basis.t());
  double hash_s = INFINITY;
  for (int run = 0; run < 3; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    content_hash(basis);
    hash_s = std::min(hash_s, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  c.hash_ms_per_byte = hash_s * 1e3 / static_cast<double>(basis.numel() * basis.element_size());
  return c;
}

using LayoutKey = std::tuple<int, bool, int, int, int>;  // dtype, threaded, log2 D, log2 r, log2 rows
std::mutex layout_costs_mutex;
std::map<LayoutKey, LayoutCosts> layout_costs;

bool basis_rows_pay(int64_t B, const at::Tensor& basis) {
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.device().is_cpu() && basis.is_contiguous() &&
                        (basis.scalar_type() == at::kFloat || basis.scalar_type() == at::kDouble),
                    "gsa_kernels::basis_rows_pay: basis must be a contiguous float32/float64 CPU "
                    "[D, r] tensor, got ", basis.scalar_type(), " ", basis.sizes());
  TORCH_CHECK_VALUE(B >= 0, "gsa_kernels::basis_rows_pay: B must be >= 0, got ", B);
  if (B == 0 || basis.numel() == 0) return false;
  // the batch's size class, timed on 2^floor(log2 B) rows; past kLayoutRowsMax rows a GEMM's
  // cost per row hardly falls further (and a first call should not time seconds of GEMMs)
  const int64_t m = std::min<int64_t>(int64_t(1) << floor_log2(B), kLayoutRowsMax);
  const LayoutKey key{static_cast<int>(basis.scalar_type()), at::get_num_threads() > 1,
                      floor_log2(basis.size(0)), floor_log2(basis.size(1)), floor_log2(m)};
  std::optional<LayoutCosts> costs;
  {
    std::lock_guard<std::mutex> lock(layout_costs_mutex);
    if (auto it = layout_costs.find(key); it != layout_costs.end()) costs = it->second;
  }
  if (!costs) {  // measured without the lock (as gemm.cpp): the first to finish decides
    const LayoutCosts measured = measure_layout_costs(basis, m);
    std::lock_guard<std::mutex> lock(layout_costs_mutex);
    costs = layout_costs.emplace(key, measured).first->second;
  }
  const double nbytes = static_cast<double>(basis.numel() * basis.element_size());
  return B * costs->rows_ms_per_row + kHashRisk * nbytes * costs->hash_ms_per_byte < B * costs->direct_ms_per_row;
}

at::Tensor basis_rows_op(const at::Tensor& basis) {
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.device().is_cpu() && basis.is_contiguous(),
                    "gsa_kernels::basis_rows: basis must be a contiguous CPU [D, r] tensor, got ",
                    basis.sizes());
  TORCH_CHECK_TYPE(basis.scalar_type() == at::kFloat || basis.scalar_type() == at::kDouble,
                   "gsa_kernels::basis_rows: basis must be float32 or float64, got ",
                   basis.scalar_type());
  return basis_rows(basis);
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("content_hash", &content_hash);
  m.impl("basis_rows", &basis_rows_op);
  m.impl("basis_rows_pay", &basis_rows_pay);
}

}  // namespace gsa::cpu
