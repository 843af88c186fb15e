// CPU kernel of local_posterior: the local score machines LS / ELS / BB-ELS (gsa_kernels/_core/_contract.py
// gives the math). For a query x[b] and pixel u, every candidate (n, v) has the squared window
// distance d2(u, v) = sum over window offsets o and channels of (x[u + o] - images[n][v + o])^2.
//
// Formulation: per shift delta = v - u, the per-pixel squared differences
//   E_delta(a) = sum_c (x[a] - images[n][a + delta])^2        (direct differences, never expanded)
// are box-summed over the P x P window (a row pass of P terms, then a column pass of P terms),
// which gives d2(u, u + delta) for every u of the shift's valid rectangle at once: O(HW (3C + 2P))
// per (query, image) per shift, every shift O(HW^2 (3C + 2P)). The vector lanes are training
// images: 16 (float) / 8 (double) images per block, stored pixel-major ([row][col][c][lane]), so
// every loop is full-width whatever H, W and the shift's rectangle.
// (Measured against unfolded-patch GEMMs, d2 = |a|^2 + |b|^2 - 2 a.b with K = C P^2: the GEMM
// needs 2 C P^2 flops per candidate against ~3C + 2P here, and its expanded form loses the
// small-sigma digits; see docs/local_score.md.)
//
// Online softmax per (query, pixel): a running max m[u] (double, one per pixel), and per lane sums
// z and accumulators acc[c] = sum p (value_c - x_u) in double. A block of 16 candidates is
// skipped (no exp) when none of them can be within kNegligible of the running max, counting the
// fast logits' error bound. Exactness: in float the fast squared distances have a relative error
// below gamma = (2P + C + 4) eps (differences, squares, the channel sum, two box sums of P terms,
// the scaling by 1 / (2 sigma^2)); lanes that may matter and whose logit error bound gamma |L|
// exceeds kLogitTol (small sigma, far matches) get d2 from the differences in double. In double
// the fast form is the exact one (error ~1e-15 |L|).
//
// Parallel: tasks (query b, chunk of image blocks); a task owns its state (memory per task:
// HW (1 + (C + 1) lanes) doubles of state, the block of images and two [H + 2p, W + 2p] planes
// of lane vectors: ~0.5 MiB for MNIST at P = 7), and the tasks of a query are merged at the end.
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace gsa::cpu {
namespace {

constexpr double kLogitTol = 2.5e-4;  // logit error left as is: TV <= tanh(e) <= e, 4x under 1e-3
constexpr double kNegligible = 50.0;  // exp(-50) = 2e-22 per candidate, ~1e-15 over 4e6 of them
constexpr int64_t kPrepackBytes = int64_t(256) << 20;  // images packed once per call up to this

using Double8 = double __attribute__((vector_size(64)));
using Float8 = float __attribute__((vector_size(32)));
using Float16 = float __attribute__((vector_size(64)));
using Int32x16 = int32_t __attribute__((vector_size(64)));
using Int64x8 = int64_t __attribute__((vector_size(64)));

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = Float16;
  using I = Int32x16;
  static constexpr int n = 16;
};
template <>
struct Lanes<double> {
  using V = Double8;
  using I = Int64x8;
  static constexpr int n = 8;
};

// std::vector of lane vectors: 64-byte aligned (the default allocator is not, in this build)
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned64<T>>;

template <typename M>
inline bool any_lane(const M& m) {
  auto acc = m[0];
  for (int i = 1; i < int(sizeof(M) / sizeof(m[0])); ++i) acc |= m[i];
  return acc != 0;
}

// the largest lane, by halving (a lane loop compiles to one extract per lane)
inline float max_lane(const Float16& v) {
  const Float16 a = v > __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
                        ? v : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const Float16 b = a > __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
                        ? a : __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  const Float16 c = b > __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
                        ? b : __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return c[0] > c[1] ? c[0] : c[1];
}
inline double max_lane(const Double8& v) {
  const Double8 a = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3) ? v : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const Double8 b = a > __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5) ? a : __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
  return b[0] > b[1] ? b[0] : b[1];
}

// exp(d) per lane for d <= 0, 0 where d <= -kNegligible (or NaN): Cody-Waite reduction
// d = n ln2 + r, the Taylor polynomial of exp(r) (degree 6 in float: relative error ~3e-7;
// degree 12 in double), 2^n from the exponent bits.
// (vectors by reference: a by-value vector argument or result has another ABI per instruction set)
template <typename T>
inline void exp_lanes(const typename Lanes<T>::V& d, typename Lanes<T>::V& out) {
  using V = typename Lanes<T>::V;
  using I = typename Lanes<T>::I;
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr int kDegree = kFloat ? 6 : 12;
  constexpr T kShift = kFloat ? T(0x1.8p23) : T(0x1.8p52);
  constexpr T kLn2Hi = kFloat ? T(0.693145751953125) : T(6.93147180369123816490e-01);
  constexpr T kLn2Lo = kFloat ? T(1.42860682030941723212e-6) : T(1.90821492927058770002e-10);
  const V zero = {};
  const auto keep = d > T(-kNegligible);
  const V dc = keep ? d : zero - T(kNegligible);
  const V t = dc * T(1.4426950408889634) + kShift;
  const V n = t - kShift;
  const V r = (dc - n * kLn2Hi) - n * kLn2Lo;
  T coef[kDegree + 1];
  coef[0] = 1;
  for (int j = 1; j <= kDegree; ++j) coef[j] = coef[j - 1] / T(j);
  V p = zero + coef[kDegree];
  for (int j = kDegree - 1; j >= 0; --j) p = p * r + coef[j];
  I bits, shift_bits;
  const V shift_v = zero + kShift;
  std::memcpy(&bits, &t, sizeof bits);
  std::memcpy(&shift_bits, &shift_v, sizeof bits);
  bits = (bits - shift_bits + (kFloat ? 127 : 1023)) << (kFloat ? 23 : 52);
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  out = keep ? p * scale : zero;
}

// 8 lanes of a lane vector as doubles (chunk k of 16 floats, or the 8 doubles)
template <typename V>
inline void chunk8(const V& v, int k, Double8& out) {
  if constexpr (sizeof(v[0]) == 8) {
    out = v;
  } else {
    Float8 h;
    std::memcpy(&h, reinterpret_cast<const float*>(&v) + 8 * k, sizeof h);
    out = __builtin_convertvector(h, Double8);
  }
}

struct Shift {
  int64_t dy, dx, i0, i1, j0, j1;  // v = u + (dy, dx) for u in rows [i0, i1), cols [j0, j1)
};

// The shifts of `mode` / `padding` and the rectangle of pixels u whose v = u + delta is a
// candidate; (0, 0) first, so that the running max starts at the same-location patches.
std::vector<Shift> shifts_of(int64_t H, int64_t W, int64_t p, int64_t mode, int64_t padding) {
  std::vector<Shift> out{{0, 0, 0, H, 0, W}};
  if (mode == 0) return out;  // LS
  const auto range = [&](int64_t d, int64_t n, int64_t& lo, int64_t& hi) {
    if (padding == 1) {  // circular: v = u + d unwrapped in [0, 2n - 1), every u
      lo = 0, hi = n;
    } else if (mode == 2 && d != 0) {  // BB-ELS: only interior rows [p, n - p) move
      lo = std::max(p, p - d), hi = std::min(n - p, n - p - d);
    } else {
      lo = std::max<int64_t>(0, -d), hi = std::min(n, n - d);
    }
  };
  const int64_t dy_lo = padding == 1 ? 0 : 1 - H, dx_lo = padding == 1 ? 0 : 1 - W;
  for (int64_t dy = dy_lo; dy < H; ++dy)
    for (int64_t dx = dx_lo; dx < W; ++dx) {
      if (dy == 0 && dx == 0) continue;
      Shift s{dy, dx, 0, 0, 0, 0};
      range(dy, H, s.i0, s.i1);
      range(dx, W, s.j0, s.j1);
      if (s.i1 > s.i0 && s.j1 > s.j0) out.push_back(s);
    }
  return out;
}

inline int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

// image pixel of padded frame index r (frame origin at -p): -1 outside (zeros)
inline int64_t frame_pixel(int64_t r, int64_t p, int64_t n, bool circular) {
  const int64_t i = r - p;
  if (circular) return wrap(i, n);
  return (i >= 0 && i < n) ? i : -1;
}

template <typename X, typename T>
void local_impl(const at::Tensor& x, const at::Tensor& images, const at::Tensor& sigma, int64_t P,
                int64_t mode, int64_t padding, int64_t kind, at::Tensor& out) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n;
  constexpr int kChunks = L / 8;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = images.size(0);
  const int64_t HW = H * W, p = P / 2;
  const bool circular = padding == 1;
  const int64_t XH = H + 2 * p, XW = W + 2 * p;                                 // query frame
  const int64_t YH = circular ? 2 * H - 1 + 2 * p : XH, YW = circular ? 2 * W - 1 + 2 * p : XW;  // images
  const std::vector<Shift> shifts = shifts_of(H, W, p, mode, padding);
  const at::Tensor xt = x.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* xp_all = xt.data_ptr<T>();
  const T* img = images.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  X* outp = out.data_ptr<X>();
  const double eps = std::numeric_limits<T>::epsilon() / 2;
  const double gamma = (2.0 * P + C + 4) * eps * 1.01;
  const double far = kLogitTol / gamma;  // logits below -far may be off by more than kLogitTol

  std::vector<char> nan_row(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < C * HW && !nan_row[b]; ++k) nan_row[b] = std::isnan(xp_all[b * C * HW + k]);

  const int64_t blocks = (N + L - 1) / L;
  // The images as lane vectors ([block][pixel][c], lanes past N zero), packed once per call when
  // that copy is small, so that a task fills its padded frame with vector copies: the strided
  // gather per lane, done per (query, block), took half of LS's time (one shift per block).
  const bool prepacked = blocks * HW * C * int64_t(sizeof(V)) <= kPrepackBytes;
  AlignedVector<V> packed(prepacked ? blocks * HW * C : 0);
  if (prepacked)
    at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
      for (int64_t blk = blk0; blk < blk1; ++blk)
        for (int64_t l = 0; l < std::min<int64_t>(L, N - blk * L); ++l)
          for (int64_t c = 0; c < C; ++c) {
            const T* src = img + ((blk * L + l) * C + c) * HW;
            for (int64_t k = 0; k < HW; ++k) packed[(blk * HW + k) * C + c][l] = src[k];
          }
    });
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t S = std::clamp<int64_t>((2 * threads + B - 1) / std::max<int64_t>(B, 1), 1, blocks);
  // per task and pixel: running max, sum of weights, accumulators [C] (already summed over lanes)
  std::vector<double> task_m(B * S * HW), task_z(B * S * HW), task_acc(B * S * HW * C);

  at::parallel_for(0, B * S, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xpad(C * XH * XW);
    AlignedVector<V> ybuf(YH * YW * C), ebuf(XH * XW), hbuf(XH * W);
    std::vector<double> m(HW);
    AlignedVector<Double8> z(HW * kChunks), acc(HW * C * kChunks);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / S, s = task % S;
      if (nan_row[b]) continue;
      const int64_t blk0 = blocks * s / S, blk1 = blocks * (s + 1) / S;
      const T* xb = xp_all + b * C * HW;
      const double c2 = 0.5 / (double(sig[b]) * double(sig[b]));
      with_isa([&] {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t r = 0; r < XH; ++r)
            for (int64_t q = 0; q < XW; ++q) {
              const int64_t i = frame_pixel(r, p, H, circular), j = frame_pixel(q, p, W, circular);
              xpad[(c * XH + r) * XW + q] = (i < 0 || j < 0) ? T(0) : xb[(c * H + i) * W + j];
            }
        const Double8 zero8 = {};
        for (int64_t u = 0; u < HW; ++u) m[u] = -std::numeric_limits<double>::infinity();
        std::fill(z.begin(), z.end(), zero8);
        std::fill(acc.begin(), acc.end(), zero8);
        const T cT = static_cast<T>(c2);
        // raw pointers: the hot loop then keeps them in registers (through the captured vectors the
        // compiler reloaded them after every store)
        double* __restrict mp = m.data();
        Double8* __restrict zp = z.data();
        Double8* __restrict accp = acc.data();
        V* __restrict ep = ebuf.data();
        V* __restrict hp = hbuf.data();
        V* __restrict yp = ybuf.data();
        const T* __restrict xq = xpad.data();
        const V* pk = packed.data();
        const V zero = {};

        // rescale pixel u's state to a new max
        const auto rescale = [&](int64_t u, double new_m) {
          const double f = std::exp(mp[u] - new_m);  // 0 from m = -inf
          for (int k = 0; k < kChunks; ++k) zp[u * kChunks + k] *= f;
          for (int64_t c = 0; c < C; ++c)
            for (int k = 0; k < kChunks; ++k) accp[(u * C + c) * kChunks + k] *= f;
          mp[u] = new_m;
        };

        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t n0 = blk * L, lanes = std::min<int64_t>(L, N - n0);
          for (int64_t r = 0; r < YH; ++r)
            for (int64_t q = 0; q < YW; ++q) {
              const int64_t i = frame_pixel(r, p, H, circular), j = frame_pixel(q, p, W, circular);
              for (int64_t c = 0; c < C; ++c) {
                V v = zero;
                if (i >= 0 && j >= 0) {
                  if (prepacked)
                    v = pk[(blk * HW + i * W + j) * C + c];
                  else
                    for (int64_t l = 0; l < lanes; ++l) v[l] = img[(((n0 + l) * C + c) * H + i) * W + j];
                }
                yp[(r * YW + q) * C + c] = v;
              }
            }
          V lane_off = zero;  // -inf on lanes past N
          for (int64_t l = lanes; l < L; ++l) lane_off[l] = -std::numeric_limits<T>::infinity();
          const auto lane_on = lane_off == zero;

          for (const Shift& sh : shifts) {
            const int64_t ni = sh.i1 - sh.i0, nj = sh.j1 - sh.j0, er = ni + 2 * p, ec = nj + 2 * p;
            // E over the rectangle and its halo (x frame rows i0 .., images frame shifted by delta)
            for (int64_t rr = 0; rr < er; ++rr) {
              const int64_t xr = sh.i0 + rr, yr = xr + sh.dy;
              for (int64_t cc = 0; cc < ec; ++cc) {
                const int64_t xc = sh.j0 + cc, yc = xc + sh.dx;
                V e = zero;
                for (int64_t c = 0; c < C; ++c) {
                  const V d = xq[(c * XH + xr) * XW + xc] - yp[(yr * YW + yc) * C + c];
                  e += d * d;
                }
                ep[rr * ec + cc] = e;
              }
            }
            for (int64_t rr = 0; rr < er; ++rr)  // row pass: P terms
              for (int64_t jj = 0; jj < nj; ++jj) {
                V h = ep[rr * ec + jj];
                for (int64_t o = 1; o < P; ++o) h += ep[rr * ec + jj + o];
                hp[rr * nj + jj] = h;
              }
            for (int64_t ii = 0; ii < ni; ++ii)
              for (int64_t jj = 0; jj < nj; ++jj) {
                V d2 = hp[ii * nj + jj];  // column pass: P terms
                for (int64_t o = 1; o < P; ++o) d2 += hp[(ii + o) * nj + jj];
                const int64_t i = sh.i0 + ii, j = sh.j0 + jj, u = i * W + j;
                const V logit = lane_off + (zero - d2) * cT;
                const double mu = mp[u];
                const T best = max_lane(logit);
                // nothing within kNegligible of the max, counting the error bound: no exp
                if (double(best) * (1 - gamma) < mu - kNegligible) continue;
                const int64_t vr = i + sh.dy + p, vc = j + sh.dx + p;  // v's centre in the images frame
                const V* vals = &yp[(vr * YW + vc) * C];
                // lanes that may matter have logits >= mu - kNegligible - 1; their bound gamma |L| may
                // exceed kLogitTol only when that is below -far
                if (std::is_same_v<T, float> && std::min(mu, double(best)) - kNegligible - 1 < -far) {
                  const T floor_t = static_cast<T>(mu - kNegligible);
                  const auto within = (logit * T(1 - gamma) >= floor_t) & lane_on;
                  if (any_lane(within & (logit * T(-gamma) > T(kLogitTol)))) {
                    // exact: d2 from the differences in double, per lane that may matter
                    for (int l = 0; l < lanes; ++l) {
                      if (!within[l]) continue;
                      double e2 = 0;
                      for (int64_t c = 0; c < C; ++c)
                        for (int64_t oy = 0; oy < P; ++oy)
                          for (int64_t ox = 0; ox < P; ++ox) {
                            const double d = double(xq[(c * XH + i + oy) * XW + j + ox]) -
                                             double(yp[((i + oy + sh.dy) * YW + j + ox + sh.dx) * C + c][l]);
                            e2 += d * d;
                          }
                      const double lg = -e2 * c2;
                      if (lg > mp[u]) rescale(u, lg);
                      if (lg - mp[u] <= -kNegligible) continue;
                      const double w = std::exp(lg - mp[u]);
                      double* zl = reinterpret_cast<double*>(&zp[u * kChunks]);
                      zl[l] += w;
                      for (int64_t c = 0; c < C; ++c) {
                        double* al = reinterpret_cast<double*>(&accp[(u * C + c) * kChunks]);
                        al[l] += w * (double(vals[c][l]) - double(xb[c * HW + u]));
                      }
                    }
                    continue;
                  }
                }
                if (best > static_cast<T>(mu)) rescale(u, double(best));
                const V shifted = logit - static_cast<T>(mp[u]);
                V w;
                exp_lanes<T>(shifted, w);
                for (int k = 0; k < kChunks; ++k) {
                  Double8 wk, dk;
                  chunk8(w, k, wk);
                  zp[u * kChunks + k] += wk;
                  for (int64_t c = 0; c < C; ++c) {
                    const V dv = vals[c] - xb[c * HW + u];
                    chunk8(dv, k, dk);
                    accp[(u * C + c) * kChunks + k] += wk * dk;
                  }
                }
              }
          }
        }
        for (int64_t u = 0; u < HW; ++u) {
          double zs = 0;
          for (int k = 0; k < kChunks; ++k)
            for (int l = 0; l < 8; ++l) zs += z[u * kChunks + k][l];
          const int64_t at = (b * S + s) * HW + u;
          task_m[at] = m[u];
          task_z[at] = zs;
          for (int64_t c = 0; c < C; ++c) {
            double a = 0;
            for (int k = 0; k < kChunks; ++k)
              for (int l = 0; l < 8; ++l) a += acc[(u * C + c) * kChunks + k][l];
            task_acc[at * C + c] = a;
          }
        }
      });
    }
  });

  // merge the tasks of each query; out = x + A / Z (denoise) or A / Z / sigma^2 (score)
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double s2 = double(sig[b]) * double(sig[b]);
      for (int64_t u = 0; u < HW; ++u) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < S; ++s) mx = std::max(mx, task_m[(b * S + s) * HW + u]);
        for (int64_t c = 0; c < C; ++c) {
          double zs = 0, a = 0;
          for (int64_t s = 0; s < S; ++s) {
            const int64_t at = (b * S + s) * HW + u;
            const double f = std::exp(task_m[at] - mx);
            zs += f * task_z[at];
            a += f * task_acc[at * C + c];
          }
          const double xv = double(xp_all[(b * C + c) * HW + u]);
          const double v = nan_row[b] ? std::numeric_limits<double>::quiet_NaN()
                                      : (kind == 0 ? xv + a / zs : a / zs / s2);
          outp[(b * C + c) * HW + u] = static_cast<X>(static_cast<T>(v));
        }
      }
    }
  });
}

at::Tensor local_posterior_cpu(const at::Tensor& x, const at::Tensor& images, const at::Tensor& sigma,
                               int64_t patch_size, int64_t mode, int64_t padding, int64_t kind) {
  constexpr const char* op = "local_posterior";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [B, C, H, W], got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                   ": x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  const auto cd = t == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(0) >= 1 && images.size(1) == x.size(1) &&
                        images.size(2) == x.size(2) && images.size(3) == x.size(3),
                    op, ": images must be [N >= 1, C, H, W] with x's C, H, W = ", x.sizes().slice(1),
                    ", got ", images.sizes());
  TORCH_CHECK_TYPE(images.scalar_type() == cd && sigma.scalar_type() == cd, op,
                   ": images and sigma must be ", cd, " for x of dtype ", t, ", got ", images.scalar_type(),
                   " and ", sigma.scalar_type());
  TORCH_CHECK_VALUE(images.is_contiguous() && sigma.is_contiguous() && images.device() == x.device() &&
                        sigma.device() == x.device(),
                    op, ": images and sigma must be contiguous and on x's device");
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == x.size(0), op, ": sigma must be [B] = [",
                    x.size(0), "], got ", sigma.sizes());
  TORCH_CHECK_VALUE(patch_size >= 1 && patch_size % 2 == 1, op, ": patch_size must be an odd int >= 1, got ",
                    patch_size);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, op, ": mode must be 0 (ls), 1 (els) or 2 (bbels), got ", mode);
  TORCH_CHECK_VALUE(padding == 0 || padding == 1, op, ": padding must be 0 (zeros) or 1 (circular), got ",
                    padding);
  TORCH_CHECK_VALUE(!(mode == 2 && padding == 1), op, ": mode bbels needs zeros padding");
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, op, ": kind must be 0 (denoise) or 1 (score), got ", kind);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, op, [&] {
    local_impl<scalar_t, at::opmath_type<scalar_t>>(x, images, sigma, patch_size, mode, padding, kind, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) { m.impl("local_posterior", &local_posterior_cpu); }

}  // namespace gsa::cpu
