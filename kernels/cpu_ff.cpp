// CPU decode kernels for Caprese: a batched GEMV and a fused gated feed-forward block that reads the up and
// down rows of active neurons only, registered as torch.library ops `caprese_cpu::linear` and
// `caprese_cpu::gated_ff`; and the prefill's backbone statistics in one call per layer (`cats_threshold`,
// `griffin_select`). kernels/cpu_ff.py builds this file on first use (-O3 -march=native); the torch references
// they must match are there and in caprese_peft.backbones.
//
// Why hand-written: at batch 1..8 a decode step is a sequence of GEMVs whose cost is reading the weights once.
// The fused block walks the neurons in tiles: the gate rows of a tile, then the up rows and the down rows of
// the neurons some sequence keeps, so each weight row is read at most once per step, as a contiguous stream,
// and skipped rows are never touched. Weights are fp32, bf16 or fp16; every product is accumulated in fp32.
// With a 4-bit stand-in (CapreseConfig.stand_in_bits=4), a neuron a row drops is computed from 4-bit copies of its
// up and down rows (and, for GRIFFIN, of its gate row) instead, read only for neurons some row drops.
// Threads (torch's intra-op OpenMP pool, at::parallel_for) split the neurons; each sums its own (B, D) partial
// output, and the partials are added at the end: no atomics, the same order for every run.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

// exp by Cephes' expf: 2^n * p(r) with r = x - n ln2, |r| <= ln2 / 2; relative error ~2e-7 (torch's is ~1e-7)
constexpr float kExpHi = 88.0f, kExpLo = -87.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_scalar(float x) {
  x = std::fmin(std::fmax(x, kExpLo), kExpHi);
  const float n = std::floor(x * kLog2e + 0.5f);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  return std::ldexp(p, static_cast<int>(n));
}

// ---- a few SIMD primitives: AVX-512, AVX2 + FMA, or scalar, whichever the compiling machine has ----

#if defined(__AVX512F__)
constexpr int64_t kWidth = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen to 32 bits and shift
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vexp(Vec x) {
  x = _mm512_max_ps(_mm512_min_ps(x, vset1(kExpHi)), vset1(kExpLo));
  const Vec n = _mm512_roundscale_ps(vfma(x, vset1(kLog2e), vset1(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  Vec r = _mm512_fnmadd_ps(n, vset1(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, vset1(kLn2Lo), r);
  Vec p = vset1(kP0);
  p = vfma(p, r, vset1(kP1));
  p = vfma(p, r, vset1(kP2));
  p = vfma(p, r, vset1(kP3));
  p = vfma(p, r, vset1(kP4));
  p = vfma(p, r, vset1(kP5));
  p = vfma(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, vset1(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}
inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
// kWidth packed bytes: their low nibbles (lo) and high nibbles (hi) as signed 4-bit integers, in fp32
inline void vload_q4(const uint8_t* p, Vec& lo, Vec& hi) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28));
  hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 4));
}
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kWidth = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float a) { return _mm256_set1_ps(a); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vexp(Vec x) {
  x = _mm256_max_ps(_mm256_min_ps(x, vset1(kExpHi)), vset1(kExpLo));
  const Vec n = _mm256_floor_ps(vfma(x, vset1(kLog2e), vset1(0.5f)));
  Vec r = _mm256_fnmadd_ps(n, vset1(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, vset1(kLn2Lo), r);
  Vec p = vset1(kP0);
  p = vfma(p, r, vset1(kP1));
  p = vfma(p, r, vset1(kP2));
  p = vfma(p, r, vset1(kP3));
  p = vfma(p, r, vset1(kP4));
  p = vfma(p, r, vset1(kP5));
  p = vfma(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, vset1(1.0f)));
  // 2^n from the exponent bits; n is in [-126, 127] after the clamp
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline void vload_q4(const uint8_t* p, Vec& lo, Vec& hi) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
  hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));
}
constexpr const char* kIsa = "avx2";
#else
constexpr int64_t kWidth = 1;
using Vec = float;
inline Vec vzero() { return 0.0f; }
inline Vec vset1(float a) { return a; }
template <typename T>
inline Vec vload(const T* p) { return static_cast<float>(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline void vstore(float* p, Vec v) { *p = v; }
inline float vsum(Vec v) { return v; }
inline Vec vexp(Vec x) { return exp_scalar(x); }
inline Vec vdiv(Vec a, Vec b) { return a / b; }
inline Vec vmul(Vec a, Vec b) { return a * b; }
inline void vload_q4(const uint8_t* p, Vec& lo, Vec& hi) {
  const int v = static_cast<int8_t>(*p);
  lo = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(v << 4)) >> 4);
  hi = static_cast<float>(v >> 4);
}
constexpr const char* kIsa = "scalar";
#endif

constexpr int64_t kMaxBatch = 8;  // rows per register tile; larger batches are cut into tiles of 8
constexpr int64_t kTile = 64;     // neurons per tile of the fused block: long contiguous gate-row streams
constexpr int kGroup = 4;         // down rows accumulated together: 4 FMAs per load/store of the partial output
// rows of weights read together: several streams in flight and one x load per NR weight loads; NR x B
// accumulators stay within the register file (32 vector registers with AVX-512, 16 with AVX2)
template <int B>
constexpr int rows_together() {
  constexpr int budget = kWidth == 16 ? 16 : 8;
  return B >= budget ? 1 : (budget / B >= 4 ? 4 : budget / B);
}

inline void prefetch(const void* p) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

// out[r * B + b] = x[b] . w[r] for NR weight rows w[r] of length n and B rows of x (fp32, row stride ldx). While
// it computes, it prefetches the same columns of the rows it will read next (`next`, NR of them): at batch >= 2
// the core is busy long enough per cache line that the hardware prefetcher alone leaves the memory bus idle.
template <int B, int NR, typename T>
inline void dot_multi(const float* x, int64_t ldx, const T* const* w, const T* const* next, int64_t n, float* out) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  Vec acc[NR][B];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = vzero();
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) {
    if (d % kLine == 0)
      for (int r = 0; r < NR; ++r) prefetch(next[r] + d);
    Vec wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = vload(w[r] + d);
    for (int b = 0; b < B; ++b) {
      const Vec xv = vload(x + b * ldx + d);
      for (int r = 0; r < NR; ++r) acc[r][b] = vfma(xv, wv[r], acc[r][b]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < B; ++b) out[r * B + b] = vsum(acc[r][b]);
  for (; d < n; ++d) {
    for (int r = 0; r < NR; ++r) {
      const float wd = static_cast<float>(w[r][d]);
      for (int b = 0; b < B; ++b) out[r * B + b] += x[b * ldx + d] * wd;
    }
  }
}

// out[s * B + b] = x[b] . rows[s] for count rows, NR at a time; `after` (may be null) is the first row of what
// the caller reads next, prefetched while the last rows are computed
template <int B, typename T>
inline void dot_many(const float* x, int64_t ldx, const T* const* rows, int64_t count, int64_t n, float* out,
                     const T* after = nullptr) {
  constexpr int NR = rows_together<B>();
  const T* next[NR];
  int64_t s = 0;
  for (; s + NR <= count; s += NR) {
    for (int r = 0; r < NR; ++r) {
      const int64_t k = s + NR + r;
      next[r] = k < count ? rows[k] : (after != nullptr ? after : rows[s + r]);
    }
    dot_multi<B, NR>(x, ldx, rows + s, next, n, out + s * B);
  }
  for (; s < count; ++s) {
    const T* nx = s + 1 < count ? rows[s + 1] : (after != nullptr ? after : rows[s]);
    dot_multi<B, 1>(x, ldx, rows + s, &nx, n, out + s * B);
  }
}

// acc[b] += sum_g coef[g * B + b] * rows[g] for kGroup rows of length n; acc is (B, n) fp32, row stride n;
// prefetches the same columns of the kGroup rows `next`
template <int B, typename T>
inline void axpy_rows(float* acc, const T* const* rows, const T* const* next, const float* coef, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) {
    if (d % kLine == 0)
      for (int g = 0; g < kGroup; ++g) prefetch(next[g] + d);
    Vec w[kGroup];
    for (int g = 0; g < kGroup; ++g) w[g] = vload(rows[g] + d);
    for (int b = 0; b < B; ++b) {
      Vec a = vload(acc + b * n + d);
      for (int g = 0; g < kGroup; ++g) a = vfma(vset1(coef[g * B + b]), w[g], a);
      vstore(acc + b * n + d, a);
    }
  }
  for (; d < n; ++d) {
    for (int b = 0; b < B; ++b) {
      float a = acc[b * n + d];
      for (int g = 0; g < kGroup; ++g) a += coef[g * B + b] * static_cast<float>(rows[g][d]);
      acc[b * n + d] = a;
    }
  }
}

// ---- 4-bit rows (the stand-in of dropped neurons): a row of n weights (n a multiple of 32) is n / 2 bytes, in
// blocks of 32 weights per 16 bytes; byte k of a block holds weight k in its low nibble and weight k + 16 in its
// high nibble, two's complement. The row's scale is applied by the caller. ----

constexpr int64_t kQ4Block = 32;

// 4-bit rows read together: as many streams in flight as the register file allows with two accumulators (the
// low and the high half of each block) per row and batch row
template <int B>
constexpr int q4_rows_together() {
  return B <= 2 ? 4 : (B <= 4 ? 2 : 1);
}

// out[r * B + b] = x[b] . rows[r] for NR 4-bit rows of n weights
// (the rows a caller reads next, `next`, are prefetched a cache line at a time: dropped neurons' rows are
// scattered, which the hardware prefetcher does not follow)
template <int B, int NR>
inline void dot_q4_multi(const float* x, int64_t ldx, const uint8_t* const* rows, const uint8_t* const* next,
                         int64_t n, float* out) {
  Vec lo_acc[NR][B], hi_acc[NR][B];  // two chains per (row, b): the FMA latency is not the limit
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < B; ++b) lo_acc[r][b] = hi_acc[r][b] = vzero();
  for (int64_t d = 0; d < n; d += kQ4Block) {
    if (d % 128 == 0)  // 128 weights: one cache line of 4-bit rows
      for (int r = 0; r < NR; ++r) prefetch(next[r] + d / 2);
    for (int64_t h = 0; h < kQ4Block / 2; h += kWidth) {
      Vec lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) vload_q4(rows[r] + d / 2 + h, lo[r], hi[r]);
      for (int b = 0; b < B; ++b) {
        const Vec xl = vload(x + b * ldx + d + h), xh = vload(x + b * ldx + d + kQ4Block / 2 + h);
        for (int r = 0; r < NR; ++r) {
          lo_acc[r][b] = vfma(xl, lo[r], lo_acc[r][b]);
          hi_acc[r][b] = vfma(xh, hi[r], hi_acc[r][b]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < B; ++b) out[r * B + b] = vsum(vadd(lo_acc[r][b], hi_acc[r][b]));
}

// out[s * B + b] = x[b] . rows[s] for count 4-bit rows
template <int B>
inline void dot_q4_many(const float* x, int64_t ldx, const uint8_t* const* rows, int64_t count, int64_t n,
                        float* out) {
  constexpr int NR = q4_rows_together<B>();
  const uint8_t* next[NR];
  int64_t s = 0;
  for (; s + NR <= count; s += NR) {
    for (int r = 0; r < NR; ++r) next[r] = rows[s + NR + r < count ? s + NR + r : s + r];
    dot_q4_multi<B, NR>(x, ldx, rows + s, next, n, out + s * B);
  }
  for (; s < count; ++s) dot_q4_multi<B, 1>(x, ldx, rows + s, rows + (s + 1 < count ? s + 1 : s), n, out + s * B);
}

// acc[b] += sum_g coef[g * B + b] * rows[g] for kGroup 4-bit rows of n weights; acc is (B, n) fp32, row stride n
template <int B>
inline void axpy_q4_rows(float* acc, const uint8_t* const* rows, const uint8_t* const* next, const float* coef,
                         int64_t n) {
  for (int64_t d = 0; d < n; d += kQ4Block) {
    if (d % 128 == 0)
      for (int g = 0; g < kGroup; ++g) prefetch(next[g] + d / 2);
    for (int64_t h = 0; h < kQ4Block / 2; h += kWidth) {
      Vec lo[kGroup], hi[kGroup];
      for (int g = 0; g < kGroup; ++g) vload_q4(rows[g] + d / 2 + h, lo[g], hi[g]);
      for (int b = 0; b < B; ++b) {
        float* a = acc + b * n + d + h;
        Vec al = vload(a), ah = vload(a + kQ4Block / 2);
        for (int g = 0; g < kGroup; ++g) {
          const Vec c = vset1(coef[g * B + b]);
          al = vfma(c, lo[g], al);
          ah = vfma(c, hi[g], ah);
        }
        vstore(a, al);
        vstore(a + kQ4Block / 2, ah);
      }
    }
  }
}

enum class Activation { kSilu, kGeluTanh };

Activation parse_activation(c10::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "caprese_cpu: activation must be 'silu' or 'gelu_tanh', got '", std::string(name), "'");
}

// v[k] = act(v[k]) for k < n; gelu_tanh as g * sigmoid(2u) == 0.5 g (1 + tanh(u)), u = sqrt(2/pi)(g + 0.044715 g^3)
inline float activate_scalar(float g, Activation act) {
  if (act == Activation::kSilu) return g / (1.0f + exp_scalar(-g));
  return g / (1.0f + exp_scalar(-1.5957691216057308f * (g + 0.044715f * g * g * g)));
}

void activate(float* v, int64_t n, Activation act) {
  int64_t k = 0;
  const Vec one = vset1(1.0f);
  if (act == Activation::kSilu) {
    for (; k + kWidth <= n; k += kWidth) {
      const Vec g = vload(v + k);
      vstore(v + k, vdiv(g, vadd(one, vexp(vmul(g, vset1(-1.0f))))));
    }
  } else {
    for (; k + kWidth <= n; k += kWidth) {
      const Vec g = vload(v + k);
      const Vec u = vmul(vset1(-1.5957691216057308f), vfma(vmul(vset1(0.044715f), g), vmul(g, g), g));
      vstore(v + k, vdiv(g, vadd(one, vexp(u))));
    }
  }
  for (; k < n; ++k) v[k] = activate_scalar(v[k], act);
}

// ---- linear: y = x @ W^T for x (B, D) and W (N, D) ----

template <int B, typename T>
void linear_tile(const float* x, int64_t ldx, const T* w, int64_t n_out, int64_t hidden, float* y, int64_t ldy) {
  constexpr int64_t kChunk = 64;  // rows per inner batch: the row pointers and outputs of one dot_many call
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    const T* rows[kChunk];
    float out[kChunk * B];
    for (int64_t j0 = begin; j0 < end; j0 += kChunk) {
      const int64_t count = std::min(kChunk, end - j0);
      for (int64_t s = 0; s < count; ++s) rows[s] = w + (j0 + s) * hidden;
      dot_many<B>(x, ldx, rows, count, hidden, out);
      for (int64_t s = 0; s < count; ++s)
        for (int b = 0; b < B; ++b) y[b * ldy + j0 + s] = out[s * B + b];
    }
  });
}

template <typename T>
void linear_impl(const float* x, int64_t batch, const T* w, int64_t n_out, int64_t hidden, float* y) {
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatch) {
    const int64_t rows = std::min(kMaxBatch, batch - b0);
    const float* xb = x + b0 * hidden;
    float* yb = y + b0 * n_out;
    with_batch(rows, [&](auto r) { linear_tile<decltype(r)::value>(xb, hidden, w, n_out, hidden, yb, n_out); });
  }
}

// rows_only: the rows may lie apart (row stride >= hidden, unit column stride), as in CatsFFWeights' interleaved
// up and down rows on a CPU; otherwise contiguous
void check_weight(const at::Tensor& w, const at::Tensor& x, const char* name, int64_t hidden, bool rows_only = false) {
  TORCH_CHECK(w.device().is_cpu(), "caprese_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == hidden, "caprese_cpu: ", name, " must be (N, ", hidden, "), got ",
              w.sizes());
  if (rows_only) {
    TORCH_CHECK((w.stride(1) == 1 || hidden == 1) && (w.stride(0) >= hidden || w.size(0) <= 1), "caprese_cpu: ",
                name, " must hold each row contiguously (strides (>= ", hidden, ", 1)), got strides ", w.strides());
  } else {
    TORCH_CHECK(w.is_contiguous(), "caprese_cpu: ", name, " must be contiguous");
  }
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "caprese_cpu: ", name, " is ", w.scalar_type(), " but x is ",
              x.scalar_type());
}

// call f with a null pointer of the weights' element type, or with std::integral_constant<int, rows>
template <typename F>
void with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "caprese_cpu: weights must be float32, bfloat16 or float16, got ", dtype);
  }
}

template <typename F>
void with_batch(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "caprese_cpu: internal error, a tile of ", rows, " rows");
  }
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "caprese_cpu::linear: x must be (B, D) on the CPU, got ",
              x.sizes());
  const int64_t batch = x.size(0), hidden = x.size(1), n_out = weight.size(0);
  check_weight(weight, x, "weight", hidden);
  at::Tensor xf = x.to(at::kFloat).contiguous();  // (B, D) is tiny next to the weights: convert it once
  at::Tensor y = at::empty({batch, n_out}, x.options().dtype(at::kFloat));
  with_dtype(weight.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    linear_impl(xf.data_ptr<float>(), batch, weight.data_ptr<scalar_t>(), n_out, hidden, y.data_ptr<float>());
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// ---- gated_ff: sum over kept neurons i of act(x . gate_i) * (x . up_i) * down_t_i, plus the r low-rank
// neurons (i >= F, rows low_up[i - F] and low_down[i - F]) with their gate fixed to 1. Neuron i is kept for row b
// where
//   threshold given: |act(x_b . gate_i)| > threshold[b]   (CATS)
//   keep given:      keep[b, i] != 0                         (GRIFFIN over the union of the rows' neurons)
//   neither:         always                                  (dense) ----

struct FFArgs {
  const float* x;  // (B, D) fp32
  int64_t batch, hidden, ff_size, n_neurons;
  const float* threshold;  // (B,) or null
  const uint8_t* keep;     // (B, keep_stride) or null; ff_size may stop short of keep_stride (see gated_ff_cpu)
  Activation act;
  // the stand-in of the neurons a row drops: 4-bit up and down rows (F, D / 2) and their scales (2, F): up's,
  // then down's; with keep (GRIFFIN), 4-bit gate rows too and scales (3, F): up's, down's, gate's, since the
  // stand-in computes a pruned neuron's gate from its 4-bit row. Null without one.
  const uint8_t *stand_up, *stand_down, *stand_gate;
  const float* stand_scale;
  int64_t keep_stride;  // the keep mask's row length: the block's F
};

// one value rounded to T and back (bf16, fp16): what a torch op producing a T tensor stores
template <typename T>
inline float rt(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<T>(v));
  }
}

// the same for n values in place
template <typename T>
inline void round_to(float* v, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t k = 0; k < n; ++k) v[k] = rt<T>(v[k]);
  }
}

// the up and down rows of neuron i: the FF weights' for i < F (row strides up_stride, down_stride: hidden, or
// 2 hidden when a neuron's up and down rows are adjacent), the low-rank factors' after them
template <typename T>
struct Rows {
  const T *gate, *up, *low_up, *down_t, *low_down;
  int64_t ff_size, hidden, up_stride, down_stride;
  const T* up_row(int64_t i) const { return i < ff_size ? up + i * up_stride : low_up + (i - ff_size) * hidden; }
  const T* down_row(int64_t i) const {
    return i < ff_size ? down_t + i * down_stride : low_down + (i - ff_size) * hidden;
  }
};

template <int B, typename T>
void gated_ff_range(const FFArgs& a, const Rows<T>& w, int64_t begin, int64_t end, float* acc) {
  const int64_t D = a.hidden;
  const T* gate = w.gate;
  float pre[kTile * B];     // gate pre-activations, then coefficients, of the tile's neurons, [j * B + b]
  float z[kTile * B];       // coefficient * up output of the active neurons, [slot * B + b]
  const T* rows[kTile];
  const T* down_rows[kTile + kGroup];
  int64_t active[kTile];  // the tile's neurons some row keeps
  int64_t slot[kTile];    // where each active neuron's coefficients are in pre
  int64_t gated[kTile];   // the tile's FF neurons whose gate is computed
  float stand_coef[kTile * B];  // activations of the neurons a row drops, 0 where the row keeps them, [s * B + b]
  int64_t stand[kTile];         // the tile's neurons some row drops (with a stand-in)
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t t1 = std::min(end, t0 + kTile);
    int64_t n_active = 0;
    // 1. gate GEMV over the tile's FF neurons (given a keep mask, only those some row keeps: GRIFFIN reads no gate
    //    row of a pruned neuron), one vectorised activation, then keep decisions; the low-rank neurons (i >= F) are
    //    always kept with gate 1
    const int64_t ff_end = std::min(t1, std::max(t0, a.ff_size));
    int64_t n_gated = 0;
    for (int64_t i = t0; i < ff_end; ++i) {
      bool any = a.keep == nullptr;
      for (int b = 0; !any && b < B; ++b) any = a.keep[b * a.keep_stride + i] != 0;
      if (any) {
        gated[n_gated] = i;
        rows[n_gated++] = gate + i * D;
      }
    }
    dot_many<B>(a.x, D, rows, n_gated, D, pre);
    round_to<T>(pre, n_gated * B);  // the gate as torch computes it in T: the same keep decisions
    activate(pre, n_gated * B, a.act);
    round_to<T>(pre, n_gated * B);
    int64_t n_stand = 0;
    for (int64_t g = 0; g < n_gated; ++g) {
      const int64_t i = gated[g];
      float* c = pre + g * B;
      bool any = false, any_dropped = false;
      for (int b = 0; b < B; ++b) {
        bool kept = true;
        if (a.threshold != nullptr) kept = std::fabs(c[b]) > a.threshold[b];
        if (a.keep != nullptr) kept = a.keep[b * a.keep_stride + i] != 0;
        stand_coef[n_stand * B + b] = kept ? 0.0f : c[b];
        any_dropped = any_dropped || (!kept && c[b] != 0.0f && a.keep == nullptr);  // GRIFFIN: below
        c[b] = kept ? c[b] : 0.0f;
        any = any || kept;
      }
      if (any) {
        slot[n_active] = g;
        active[n_active++] = i;
      }
      if (any_dropped && a.stand_up != nullptr) stand[n_stand++] = i;
    }
    for (int64_t i = std::max(t0, a.ff_size); i < t1; ++i) {  // the low-rank neurons
      for (int b = 0; b < B; ++b) pre[n_gated * B + b] = 1.0f;
      slot[n_active] = n_gated++;
      active[n_active++] = i;
    }
    // 2. the active neurons kGroup at a time: their up rows, then their down rows. Where a neuron's up and down rows
    //    are adjacent (CatsFFWeights on a CPU), each kept neuron is one contiguous stream of 2 D weights rather than
    //    two streams of D: about a tenth off CATS's block, whose kept neurons are scattered (kernels/CPU.md). A
    //    short last group repeats a row with coefficient 0.
    for (int64_t s = 0; s < n_active; ++s) {
      rows[s] = w.up_row(active[s]);
      down_rows[s] = w.down_row(active[s]);
    }
    for (int64_t s = n_active; s % kGroup != 0; ++s) down_rows[s] = down_rows[n_active > 0 ? 0 : s];
    constexpr int NR = rows_together<B>();
    for (int64_t s = 0; s < n_active; s += kGroup) {
      const int64_t count = std::min<int64_t>(kGroup, n_active - s);
      float* zs = z + s * B;
      if (count == kGroup && NR == kGroup) {
        dot_multi<B, NR>(a.x, D, rows + s, down_rows + s, D, zs);  // prefetching the group's down rows
      } else {
        dot_many<B>(a.x, D, rows + s, count, D, zs, down_rows[s]);
      }
      for (int64_t k = 0; k < kGroup; ++k) {
        const float* c = k < count ? pre + slot[s + k] * B : nullptr;
        for (int b = 0; b < B; ++b) zs[k * B + b] = c != nullptr ? zs[k * B + b] * c[b] : 0.0f;
      }
      // while the down rows are read, the next group's up rows; after the last group, this group's (cached)
      const T* const* next = s + 2 * kGroup <= n_active ? rows + s + kGroup : down_rows + s;
      axpy_rows<B>(acc, down_rows + s, next, zs, D);
    }
    // 4. the dropped neurons from their 4-bit rows: act * scale_up (x . up_q) * scale_down down_q, where act is
    //    the exact gate activation (CATS) or, for a neuron GRIFFIN prunes, act(scale_gate (x . gate_q))
    if (a.stand_up != nullptr && a.keep != nullptr) {
      n_stand = 0;
      for (int64_t i = t0; i < ff_end; ++i) {
        bool any_pruned = false;
        for (int b = 0; b < B; ++b) {
          const bool pruned = a.keep[b * a.keep_stride + i] == 0;
          stand_coef[n_stand * B + b] = pruned ? 1.0f : 0.0f;
          any_pruned = any_pruned || pruned;
        }
        if (any_pruned) stand[n_stand++] = i;
      }
    }
    if (n_stand > 0) {
      float* coef = z;  // (the up outputs of step 2 are consumed): the stand-in neurons' coefficients, [s * B + b]
      const uint8_t* q_rows[kTile + kGroup];
      if (a.keep != nullptr) {  // GRIFFIN: the pruned neurons' gates from their 4-bit rows
        for (int64_t s = 0; s < n_stand; ++s) q_rows[s] = a.stand_gate + stand[s] * (D / 2);
        dot_q4_many<B>(a.x, D, q_rows, n_stand, D, coef);
        for (int64_t s = 0; s < n_stand; ++s)
          for (int b = 0; b < B; ++b) coef[s * B + b] *= a.stand_scale[2 * a.ff_size + stand[s]];
        round_to<T>(coef, n_stand * B);
        activate(coef, n_stand * B, a.act);
        round_to<T>(coef, n_stand * B);
        for (int64_t k = 0; k < n_stand * B; ++k) stand_coef[k] *= coef[k];
      }
      for (int64_t s = 0; s < n_stand; ++s) q_rows[s] = a.stand_up + stand[s] * (D / 2);
      dot_q4_many<B>(a.x, D, q_rows, n_stand, D, coef);
      for (int64_t s = 0; s < n_stand; ++s) {
        const float scale = a.stand_scale[stand[s]] * a.stand_scale[a.ff_size + stand[s]];
        for (int b = 0; b < B; ++b) coef[s * B + b] *= scale * stand_coef[s * B + b];
        q_rows[s] = a.stand_down + stand[s] * (D / 2);
      }
      int64_t padded = n_stand;  // a short last group repeats a row with coefficient 0
      for (; padded % kGroup != 0; ++padded) {
        q_rows[padded] = q_rows[0];
        for (int b = 0; b < B; ++b) coef[padded * B + b] = 0.0f;
      }
      for (int64_t s = 0; s < padded; s += kGroup) {
        const uint8_t* const* next = s + kGroup < padded ? q_rows + s + kGroup : q_rows + s;
        axpy_q4_rows<B>(acc, q_rows + s, next, coef + s * B, D);
      }
    }
  }
}

template <int B, typename T>
void gated_ff_tile(const FFArgs& a, const Rows<T>& w, float* out) {
  const int64_t D = a.hidden;
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * B * D, 0.0f);
  // grain: below ~4 tiles per thread the fork costs more than it saves
  at::parallel_for(0, a.n_neurons, 4 * kTile, [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * B * D;
    gated_ff_range<B>(a, w, begin, end, acc);
  });
  for (int64_t k = 0; k < B * D; ++k) {
    float s = 0.0f;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * B * D + k];
    out[k] = s;
  }
}

at::Tensor gated_ff_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& low_up,
                        const at::Tensor& down_t, const at::Tensor& low_down,
                        const c10::optional<at::Tensor>& threshold, const c10::optional<at::Tensor>& keep,
                        c10::string_view activation, const c10::optional<at::Tensor>& stand_up,
                        const c10::optional<at::Tensor>& stand_down, const c10::optional<at::Tensor>& stand_scale,
                        const c10::optional<at::Tensor>& stand_gate) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "caprese_cpu::gated_ff: x must be (B, D) on the CPU, got ",
              x.sizes());
  const int64_t batch = x.size(0), hidden = x.size(1), ff_size = gate.size(0), rank = low_up.size(0);
  check_weight(gate, x, "gate", hidden);
  check_weight(up, x, "up", hidden, true);
  check_weight(down_t, x, "down_t", hidden, true);
  check_weight(low_up, x, "low_up", hidden);
  check_weight(low_down, x, "low_down", hidden);
  TORCH_CHECK(up.size(0) == ff_size && down_t.size(0) == ff_size,
              "caprese_cpu::gated_ff: gate, up and down_t must all have F rows, got ", ff_size, ", ", up.size(0),
              " and ", down_t.size(0));
  TORCH_CHECK(low_down.size(0) == rank, "caprese_cpu::gated_ff: low_up and low_down must both have r rows, got ",
              rank, " and ", low_down.size(0));
  TORCH_CHECK(!(threshold.has_value() && keep.has_value()), "caprese_cpu::gated_ff: threshold or keep, not both");
  at::Tensor thr, kp;
  if (threshold.has_value()) {
    thr = threshold->to(at::kFloat).contiguous();
    TORCH_CHECK(thr.numel() == batch, "caprese_cpu::gated_ff: threshold needs one value per row, got ",
                thr.sizes());
  }
  if (keep.has_value()) {
    kp = keep->to(at::kByte).contiguous();
    TORCH_CHECK(kp.dim() == 2 && kp.size(0) == batch && kp.size(1) == ff_size,
                "caprese_cpu::gated_ff: keep must be (B, ff_size) = (", batch, ", ", ff_size, "), got ", kp.sizes());
  }
  const bool has_stand = stand_up.has_value();
  TORCH_CHECK(has_stand == stand_down.has_value() && has_stand == stand_scale.has_value(),
              "caprese_cpu::gated_ff: stand_up, stand_down and stand_scale go together");
  if (has_stand) {
    TORCH_CHECK(threshold.has_value() || keep.has_value(),
                "caprese_cpu::gated_ff: a stand-in needs a threshold (CATS) or a keep mask (GRIFFIN)");
    TORCH_CHECK(keep.has_value() == stand_gate.has_value(),
                "caprese_cpu::gated_ff: a stand-in with a keep mask (GRIFFIN) needs stand_gate, one with a threshold "
                "(CATS) none");
    TORCH_CHECK(hidden % kQ4Block == 0, "caprese_cpu::gated_ff: a 4-bit stand-in needs D a multiple of ", kQ4Block,
                ", got ", hidden);
    std::vector<const at::Tensor*> packed{&*stand_up, &*stand_down};
    if (stand_gate.has_value()) packed.push_back(&*stand_gate);
    for (const at::Tensor* t : packed) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kByte && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == ff_size && t->size(1) == hidden / 2,
                  "caprese_cpu::gated_ff: stand_up, stand_down and stand_gate must be contiguous uint8 (", ff_size, ", ",
                  hidden / 2, ") on the CPU, got ", t->sizes(), " ", t->scalar_type());
    }
    TORCH_CHECK(stand_scale->device().is_cpu() && stand_scale->scalar_type() == at::kFloat &&
                    stand_scale->is_contiguous() && stand_scale->numel() == (keep.has_value() ? 3 : 2) * ff_size,
                "caprese_cpu::gated_ff: stand_scale must be contiguous float32 (", keep.has_value() ? 3 : 2, ", ",
                ff_size, "), got ", stand_scale->sizes());
  }
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({batch, hidden}, x.options().dtype(at::kFloat));
  const Activation act = parse_activation(activation);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatch) {
    const int64_t rows = std::min(kMaxBatch, batch - b0);
    // neurons past the last one some row keeps are never read (without a stand-in, which computes pruned ones):
    // the threads split only the rest, so that a block whose kept rows come first (GRIFFIN's packed rows, unused
    // capacity after them) is split evenly
    int64_t live = ff_size;
    if (kp.defined() && !has_stand) {
      const uint8_t* k = kp.data_ptr<uint8_t>() + b0 * ff_size;
      for (live = ff_size; live > 0; --live) {
        bool any = false;
        for (int64_t b = 0; b < rows && !any; ++b) any = k[b * ff_size + live - 1] != 0;
        if (any) break;
      }
    }
    FFArgs a{xf.data_ptr<float>() + b0 * hidden,
             rows,
             hidden,
             live,
             live + rank,
             thr.defined() ? thr.data_ptr<float>() + b0 : nullptr,
             kp.defined() ? kp.data_ptr<uint8_t>() + b0 * ff_size : nullptr,
             act,
             has_stand ? stand_up->data_ptr<uint8_t>() : nullptr,
             has_stand ? stand_down->data_ptr<uint8_t>() : nullptr,
             stand_gate.has_value() ? stand_gate->data_ptr<uint8_t>() : nullptr,
             has_stand ? stand_scale->data_ptr<float>() : nullptr,
             ff_size};
    float* o = out.data_ptr<float>() + b0 * hidden;
    with_dtype(x.scalar_type(), [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      const Rows<scalar_t> w{gate.data_ptr<scalar_t>(),   up.data_ptr<scalar_t>(),       low_up.data_ptr<scalar_t>(),
                             down_t.data_ptr<scalar_t>(), low_down.data_ptr<scalar_t>(), live,
                             hidden,                      up.stride(0),                  down_t.stride(0)};
      with_batch(rows, [&](auto r) { gated_ff_tile<decltype(r)::value>(a, w, o); });
    });
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// ---- decode blocks: each half of a decoder layer in one call (the chain of calls a CPU decode step makes:
// per layer attention_block, then ff_block; norm_linear for the head). Each reproduces the torch step of
// caprese_peft.fast_decode.lean (its specification) in fp32, rounding to the model's dtype T where that step
// stores a T tensor. A step compiled by inductor spends about 4 ms of SmolLM2's 25 outside the ops, in the small
// kernels and dispatch between them; these calls leave Python a loop over layers. ----

// out (n) = the RMSNorm of h (n) with weight w, as lean.rms_norm computes it in T: statistics in fp32, the
// normalised values rounded to T, then scaled by the weight in T. h: T values, or fp32 ones already rounded to T (a
// head's query or key: lean's q_norm and k_norm); out may be h
template <typename T, typename In>
void rms_norm_row(const In* h, const T* w, int64_t n, double eps, float* out) {
  float sum = 0.0f;
  for (int64_t k = 0; k < n; ++k) sum += static_cast<float>(h[k]) * static_cast<float>(h[k]);
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
  for (int64_t k = 0; k < n; ++k) out[k] = rt<T>(static_cast<float>(w[k]) * rt<T>(static_cast<float>(h[k]) * r));
}

// rotary embedding of v (hd) in place, the rotate-half convention of lean.apply_rope: v * cos + rotated * sin
template <typename T>
void rope_inplace(float* v, const T* cos, const T* sin, int64_t hd, float* tmp) {
  const int64_t half = hd / 2;
  for (int64_t k = 0; k < hd; ++k) tmp[k] = k < half ? -v[k + half] : v[k - half];
  for (int64_t k = 0; k < hd; ++k)
    v[k] = rt<T>(rt<T>(v[k] * static_cast<float>(cos[k])) + rt<T>(tmp[k] * static_cast<float>(sin[k])));
}

template <typename T>
inline float dot_row(const float* q, const T* k, int64_t n) {
  Vec acc = vzero();
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) acc = vfma(vload(q + d), vload(k + d), acc);
  float s = vsum(acc);
  for (; d < n; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

template <typename T>
inline void axpy_row(float* out, float c, const T* v, int64_t n) {
  const Vec cv = vset1(c);
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) vstore(out + d, vfma(cv, vload(v + d), vload(out + d)));
  for (; d < n; ++d) out[d] += c * static_cast<float>(v[d]);
}

// out (hd) = sum_j p[j] v[j] over n rows v (row stride hd), rows with p[j] = 0 skipped; kAcc vectors of the output
// at a time kept in registers across the rows
template <typename T>
void weighted_rows(float* out, const float* p, const T* v, int64_t n, int64_t hd) {
  constexpr int kAcc = 4;
  int64_t c = 0;
  for (; c + kAcc * kWidth <= hd; c += kAcc * kWidth) {
    Vec acc[kAcc];
    for (int u = 0; u < kAcc; ++u) acc[u] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0.0f) continue;
      const Vec w = vset1(p[j]);
      const T* row = v + j * hd + c;
      for (int u = 0; u < kAcc; ++u) acc[u] = vfma(w, vload(row + u * kWidth), acc[u]);
    }
    for (int u = 0; u < kAcc; ++u) vstore(out + c + u * kWidth, acc[u]);
  }
  if (c < hd) {
    std::fill(out + c, out + hd, 0.0f);
    for (int64_t j = 0; j < n; ++j)
      if (p[j] != 0.0f) axpy_row(out + c, p[j], v + j * hd + c, hd - c);
  }
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]);
}

void check_block_tensor(const at::Tensor& t, at::ScalarType dtype, std::initializer_list<int64_t> shape,
                        const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), "caprese_cpu::", op, ": ", name,
              " must be a contiguous ", dtype, " tensor on the CPU, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), "caprese_cpu::", op, ": ", name, " must have ",
              shape.size(), " dimensions, got ", t.sizes());
  int64_t i = 0;
  for (int64_t size : shape) {
    TORCH_CHECK(size < 0 || t.size(i) == size, "caprese_cpu::", op, ": ", name, " has shape ", t.sizes(),
                "; dimension ", i, " must be ", size);
    ++i;
  }
}

void check_optional(const c10::optional<at::Tensor>& t, at::ScalarType dtype, int64_t size, const char* op,
                    const char* name) {
  if (t.has_value()) check_block_tensor(*t, dtype, {size}, op, name);
}

// h + o(attention(rope(q), rope(k) and v written at slot)), q, k, v = qkv(rms_norm(h)): one decode token per row
// of h (B, D) over the KV cache (B, Hkv, S, hd), whose slots 0..slot it reads. Key j is visible to row b where
// prompt_visible[b, j] (a real prompt token) or j >= prompt_width (a generated one). Query head i shares key and
// value head i / (heads / Hkv) (transformers' repeat_kv order). cos, sin (S', hd): rotary tables indexed by
// positions (B,).
at::Tensor attention_block_cpu(const at::Tensor& h, const at::Tensor& positions, int64_t slot,
                               const at::Tensor& norm_weight, double eps, const at::Tensor& qkv,
                               const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& q_norm,
                               const c10::optional<at::Tensor>& k_norm, double qk_eps, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& prompt_visible, int64_t prompt_width, const at::Tensor& o,
                               const c10::optional<at::Tensor>& o_bias, int64_t heads, double scaling) {
  constexpr const char* op = "attention_block";
  TORCH_CHECK(h.dim() == 2, "caprese_cpu::attention_block: h must be (B, D), got ", h.sizes());
  const at::ScalarType dtype = h.scalar_type();
  const int64_t batch = h.size(0), hidden = h.size(1);
  TORCH_CHECK(k_cache.dim() == 4, "caprese_cpu::attention_block: k_cache must be (B, Hkv, S, hd), got ",
              k_cache.sizes());
  const int64_t kv_heads = k_cache.size(1), seq = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(heads > 0 && heads % kv_heads == 0, "caprese_cpu::attention_block: ", heads,
              " query heads do not share ", kv_heads, " key/value heads evenly");
  const int64_t q_size = heads * hd, kv_size = kv_heads * hd, n_qkv = q_size + 2 * kv_size;
  check_block_tensor(h, dtype, {batch, hidden}, op, "h");
  check_block_tensor(positions, at::kLong, {batch}, op, "positions");
  check_block_tensor(norm_weight, dtype, {hidden}, op, "norm_weight");
  check_block_tensor(qkv, dtype, {n_qkv, hidden}, op, "qkv");
  check_optional(qkv_bias, dtype, n_qkv, op, "qkv_bias");
  check_optional(q_norm, dtype, hd, op, "q_norm");
  check_optional(k_norm, dtype, hd, op, "k_norm");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "caprese_cpu::attention_block: q_norm and k_norm go together");
  check_block_tensor(cos, dtype, {-1, hd}, op, "cos");
  check_block_tensor(sin, dtype, {cos.size(0), hd}, op, "sin");
  check_block_tensor(k_cache, dtype, {batch, kv_heads, seq, hd}, op, "k_cache");
  check_block_tensor(v_cache, dtype, {batch, kv_heads, seq, hd}, op, "v_cache");
  check_block_tensor(prompt_visible, at::kBool, {batch, seq}, op, "prompt_visible");
  check_block_tensor(o, dtype, {hidden, q_size}, op, "o");
  check_optional(o_bias, dtype, hidden, op, "o_bias");
  TORCH_CHECK(hd % 2 == 0, "caprese_cpu::attention_block: the head size must be even for rotary, got ", hd);
  TORCH_CHECK(slot >= 0 && slot < seq && prompt_width >= 0 && prompt_width <= slot,
              "caprese_cpu::attention_block: need 0 <= prompt_width <= slot < ", seq, ", got prompt_width ",
              prompt_width, " and slot ", slot);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < cos.size(0), "caprese_cpu::attention_block: position ", pos[b],
                " is outside the rotary tables (", cos.size(0), " positions)");
  at::Tensor out = at::empty({batch, hidden}, h.options());
  with_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* hp = h.data_ptr<T>();
    std::vector<float> xn(batch * hidden), proj(batch * n_qkv), attn(batch * q_size), tmp(hd);
    for (int64_t b = 0; b < batch; ++b)
      rms_norm_row(hp + b * hidden, norm_weight.data_ptr<T>(), hidden, eps, xn.data() + b * hidden);
    linear_impl(xn.data(), batch, qkv.data_ptr<T>(), n_qkv, hidden, proj.data());
    const T* qkv_b = qkv_bias.has_value() ? qkv_bias->data_ptr<T>() : nullptr;
    T* kc = k_cache.data_ptr<T>();
    T* vc = v_cache.data_ptr<T>();
    for (int64_t b = 0; b < batch; ++b) {
      float* p = proj.data() + b * n_qkv;
      for (int64_t k = 0; k < n_qkv; ++k) p[k] = qkv_b != nullptr ? rt<T>(rt<T>(p[k]) + static_cast<float>(qkv_b[k]))
                                                                  : rt<T>(p[k]);
      const T* c = cos.data_ptr<T>() + pos[b] * hd;
      const T* s = sin.data_ptr<T>() + pos[b] * hd;
      for (int64_t i = 0; i < heads + kv_heads; ++i) {  // the query heads, then the key heads
        float* v = p + i * hd;
        if (q_norm.has_value()) rms_norm_row(v, (i < heads ? q_norm : k_norm)->data_ptr<T>(), hd, qk_eps, v);
        rope_inplace(v, c, s, hd, tmp.data());
      }
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at_slot = ((b * kv_heads + g) * seq + slot) * hd;
        store_row(kc + at_slot, p + q_size + g * hd, hd);
        store_row(vc + at_slot, p + q_size + kv_size + g * hd, hd);
      }
    }
    const int64_t group = heads / kv_heads, n = slot + 1;
    const bool* visible = prompt_visible.data_ptr<bool>();
    const float scale = static_cast<float>(scaling);
    // one task per (row, query head); a head's keys and values are its slots' contiguous rows
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> score(n);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads, i = task % heads;
        const float* q = proj.data() + b * n_qkv + i * hd;
        const int64_t base = (b * kv_heads + i / group) * seq * hd;
        const T* keys = kc + base;
        const T* values = vc + base;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const bool seen = j >= prompt_width || visible[b * seq + j];
          score[j] = seen ? rt<T>(rt<T>(dot_row(q, keys + j * hd, hd)) * scale) : -std::numeric_limits<float>::infinity();
          top = std::max(top, score[j]);
        }
        // softmax: a vectorised exp, then each key's weight (0 for a masked key, whose exp only underflows)
        const Vec shift = vset1(-top);
        Vec sums = vzero();
        int64_t j = 0;
        for (; j + kWidth <= n; j += kWidth) {
          const Vec e = vexp(vadd(vload(score.data() + j), shift));
          vstore(score.data() + j, e);
          sums = vadd(sums, e);
        }
        float total = vsum(sums);
        for (; j < n; ++j) {
          score[j] = exp_scalar(score[j] - top);
          total += score[j];
        }
        const float inv = 1.0f / total;
        for (j = 0; j < n; ++j) {
          const bool seen = j >= prompt_width || visible[b * seq + j];
          score[j] = seen ? rt<T>(score[j] * inv) : 0.0f;
        }
        float* a = attn.data() + b * q_size + i * hd;
        weighted_rows(a, score.data(), values, n, hd);
        round_to<T>(a, hd);
      }
    });
    linear_impl(attn.data(), batch, o.data_ptr<T>(), hidden, q_size, xn.data());  // xn is free again: o(attn)
    const T* o_b = o_bias.has_value() ? o_bias->data_ptr<T>() : nullptr;
    T* dst = out.data_ptr<T>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t k = 0; k < hidden; ++k) {
        float y = rt<T>(xn[b * hidden + k]);
        if (o_b != nullptr) y = rt<T>(y + static_cast<float>(o_b[k]));
        dst[b * hidden + k] = static_cast<T>(static_cast<float>(hp[b * hidden + k]) + y);
      }
    }
  });
  return out;
}

// rms_norm(h) (B, D) in h's dtype, as lean.rms_norm computes it
at::Tensor normed(const at::Tensor& h, const at::Tensor& norm_weight, double eps, const char* op) {
  TORCH_CHECK(h.dim() == 2, "caprese_cpu::", op, ": h must be (B, D), got ", h.sizes());
  check_block_tensor(h, h.scalar_type(), {h.size(0), h.size(1)}, op, "h");
  check_block_tensor(norm_weight, h.scalar_type(), {h.size(1)}, op, "norm_weight");
  at::Tensor x = at::empty_like(h);
  with_dtype(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    std::vector<float> row(h.size(1));
    for (int64_t b = 0; b < h.size(0); ++b) {
      rms_norm_row(h.data_ptr<T>() + b * h.size(1), norm_weight.data_ptr<T>(), h.size(1), eps, row.data());
      store_row(x.data_ptr<T>() + b * h.size(1), row.data(), h.size(1));
    }
  });
  return x;
}

// h + gated_ff(rms_norm(h), ...): a decoder layer's FF half; the arguments after eps are gated_ff's after x
at::Tensor ff_block_cpu(const at::Tensor& h, const at::Tensor& norm_weight, double eps, const at::Tensor& gate,
                        const at::Tensor& up, const at::Tensor& low_up, const at::Tensor& down_t,
                        const at::Tensor& low_down, const c10::optional<at::Tensor>& threshold,
                        const c10::optional<at::Tensor>& keep, c10::string_view activation,
                        const c10::optional<at::Tensor>& stand_up, const c10::optional<at::Tensor>& stand_down,
                        const c10::optional<at::Tensor>& stand_scale, const c10::optional<at::Tensor>& stand_gate) {
  const at::Tensor x = normed(h, norm_weight, eps, "ff_block");
  at::Tensor out = gated_ff_cpu(x, gate, up, low_up, down_t, low_down, threshold, keep, activation, stand_up,
                                stand_down, stand_scale, stand_gate);
  with_dtype(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* y = out.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    for (int64_t k = 0; k < h.numel(); ++k) y[k] = static_cast<T>(static_cast<float>(hp[k]) + static_cast<float>(y[k]));
  });
  return out;
}

// the head: rms_norm(h) @ weight^T (B, V), fp32 logits of values rounded to h's dtype (lean's gemv then .float())
at::Tensor norm_linear_cpu(const at::Tensor& h, const at::Tensor& norm_weight, double eps, const at::Tensor& weight) {
  at::Tensor logits = linear_cpu(normed(h, norm_weight, eps, "norm_linear"), weight);
  return logits.scalar_type() == at::kFloat ? logits : logits.to(at::kFloat);
}

// ---- prompt statistics: what a prefill computes per layer for the backbones (the specifications are
// caprese_peft.backbones.cats.cats_thresholds and caprese_peft.backbones.griffin's griffin_scores and top_neurons).
// One call per layer: a prefill runs them right after the block's large matrix products, where each of the dozen
// small torch ops they replace starts with cold caches. ----

// the positions s of row b where mask (B, S) is nonzero; throws ValueError naming the rows that have none
std::vector<std::vector<int64_t>> real_tokens(const at::Tensor& mask) {
  const int64_t batch = mask.size(0), seq = mask.size(1);
  const auto* m = static_cast<const uint8_t*>(mask.data_ptr());  // bool or uint8: one byte, 0 or 1
  std::vector<std::vector<int64_t>> tokens(batch);
  std::string empty;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s)
      if (m[b * seq + s] != 0) tokens[b].push_back(s);
    if (tokens[b].empty()) empty += (empty.empty() ? "" : ", ") + std::to_string(b);
  }
  TORCH_CHECK_VALUE(empty.empty(), "Sequences [", empty,
                    "] have no prompt tokens to calibrate the sparse backbone on.");
  return tokens;
}

at::Tensor check_token_mask(const at::Tensor& values, const at::Tensor& token_mask, const char* op) {
  TORCH_CHECK(values.dim() == 3 && values.device().is_cpu(), "caprese_cpu::", op,
              ": values must be (B, S, F) on the CPU, got ", values.sizes());
  TORCH_CHECK(token_mask.dim() == 2 && token_mask.size(0) == values.size(0) && token_mask.size(1) == values.size(1),
              "caprese_cpu::", op, ": token_mask must be (B, S) = (", values.size(0), ", ", values.size(1), "), got ",
              token_mask.sizes());
  const bool bytes = token_mask.scalar_type() == at::kBool || token_mask.scalar_type() == at::kByte;
  return (bytes ? token_mask : token_mask.to(at::kByte)).contiguous();
}

// the k-th smallest (0-based) of n values that are all >= 0 or NaN: their bit patterns, as unsigned integers, are in
// the same order (a NaN above everything, as torch sorts it). One histogram pass over the top 12 bits finds the
// bucket that holds it; a selection among that bucket's values (a few percent of them) finishes.
float select_nonnegative(const float* values, int64_t n, int64_t k) {
  constexpr int kBits = 12, kShift = 32 - kBits;
  std::vector<int32_t> count(1 << kBits, 0);
  const auto* bits = reinterpret_cast<const uint32_t*>(values);
  for (int64_t j = 0; j < n; ++j) ++count[bits[j] >> kShift];
  int64_t bucket = 0, below = 0;
  for (; below + count[bucket] <= k; ++bucket) below += count[bucket];
  std::vector<uint32_t> candidates;
  candidates.reserve(count[bucket]);
  for (int64_t j = 0; j < n; ++j)
    if ((bits[j] >> kShift) == static_cast<uint32_t>(bucket)) candidates.push_back(bits[j]);
  std::nth_element(candidates.begin(), candidates.begin() + (k - below), candidates.end());
  const uint32_t chosen = candidates[k - below];
  float out;
  std::memcpy(&out, &chosen, sizeof(out));
  return out;
}

// The sampled positions of a row with `count` real tokens: draw u picks token t = floor(u count) and column
// c = floor(frac(u count) width); kept as (t, c) pairs in increasing order (the order statistic does not depend on
// the order, and increasing positions read the row front to back). Cached per draws and shape: a prompt length's
// positions are computed once.
struct SamplePositions {
  std::vector<int32_t> token, column;
};

std::shared_ptr<const SamplePositions> sample_positions(const double* u, int64_t count, int64_t width,
                                                        int64_t sample) {
  uint64_t first;
  std::memcpy(&first, u, sizeof(first));
  using Key = std::tuple<const double*, uint64_t, int64_t, int64_t, int64_t>;
  static std::mutex lock;
  static std::map<Key, std::shared_ptr<const SamplePositions>> cache;
  const Key key{u, first, count, width, sample};
  {
    std::lock_guard<std::mutex> guard(lock);
    auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  std::vector<int64_t> flat(sample);
  for (int64_t j = 0; j < sample; ++j) {
    const double scaled = u[j] * static_cast<double>(count);
    const int64_t t = std::min(static_cast<int64_t>(scaled), count - 1);
    const int64_t c = std::min(static_cast<int64_t>((scaled - static_cast<double>(t)) * width), width - 1);
    flat[j] = t * width + c;
  }
  std::sort(flat.begin(), flat.end());
  auto positions = std::make_shared<SamplePositions>();
  positions->token.resize(sample);
  positions->column.resize(sample);
  for (int64_t j = 0; j < sample; ++j) {
    positions->token[j] = static_cast<int32_t>(flat[j] / width);
    positions->column[j] = static_cast<int32_t>(flat[j] % width);
  }
  std::lock_guard<std::mutex> guard(lock);
  if (cache.size() >= 256) cache.clear();  // prompt lengths come and go; holders keep their own copy alive
  cache.emplace(key, positions);
  return positions;
}

// CATS: per row b, the n_drop-th smallest |gate| over its real tokens (n_drop = n - round(density n)), -1 where
// n_drop is 0; over every value, or where the row holds more than `sample` (>= 0), over the fixed sample the
// draws u (fp64) give: token floor(u T) of the row's T real ones, column floor(frac(u T) F). Returns (B, 1, 1) fp32.
at::Tensor cats_threshold_cpu(const at::Tensor& gate, const at::Tensor& token_mask, const at::Tensor& draws,
                              int64_t sample, double density) {
  const at::Tensor mask = check_token_mask(gate, token_mask, "cats_threshold");
  TORCH_CHECK(draws.scalar_type() == at::kDouble && draws.dim() == 1 && draws.is_contiguous() &&
                  draws.device().is_cpu() && (sample < 0 || draws.numel() >= sample),
              "caprese_cpu::cats_threshold: draws must be contiguous float64 with at least `sample` values");
  const at::Tensor g = gate.contiguous();
  const int64_t batch = g.size(0), seq = g.size(1), width = g.size(2);
  const auto tokens = real_tokens(mask);
  const double* u = draws.data_ptr<double>();
  at::Tensor out = at::empty({batch, 1, 1}, g.options().dtype(at::kFloat));  // CatsStats.threshold's shape
  float* thr = out.data_ptr<float>();
  with_dtype(g.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* base = g.data_ptr<scalar_t>();
    // rows in parallel; one row runs on the calling thread (a parallel region costs more than it saves)
    at::parallel_for(0, batch, batch > 1 ? 1 : 2, [&](int64_t begin, int64_t end) {
      std::vector<float> values;
      for (int64_t b = begin; b < end; ++b) {
        const auto& pos = tokens[b];
        const int64_t count = static_cast<int64_t>(pos.size());
        const scalar_t* row = base + b * seq * width;
        values.clear();
        if (sample >= 0 && count * width > sample) {
          values.resize(sample);
          const auto positions = sample_positions(u, count, width, sample);
          const int32_t* token = positions->token.data();
          const int32_t* column = positions->column.data();
          for (int64_t j = 0; j < sample; ++j)
            values[j] = std::fabs(static_cast<float>(row[pos[token[j]] * width + column[j]]));
        } else {
          values.resize(count * width);
          for (int64_t t = 0; t < count; ++t)
            for (int64_t c = 0; c < width; ++c)
              values[t * width + c] = std::fabs(static_cast<float>(row[pos[t] * width + c]));
        }
        const int64_t n = static_cast<int64_t>(values.size());
        const int64_t n_drop = n - static_cast<int64_t>(std::nearbyint(density * static_cast<double>(n)));
        if (n_drop <= 0) {  // density 1: keep everything, even exact zeros
          thr[b] = -1.0f;
          continue;
        }
        thr[b] = select_nonnegative(values.data(), n, n_drop - 1);
      }
    });
  });
  return out;
}

// GRIFFIN: per row b, score_j = sqrt(sum_i w_i z_ij^2) over its real tokens i, w_i = 1 / max(sum_j z_ij^2, FLT_MIN)
// (the l2 norm over tokens of the row-normalised |z|), and keep: the k highest scores (ties to the lower neuron).
// Returns score (B, F) fp32 and keep (B, 1, F) bool.
std::tuple<at::Tensor, at::Tensor> griffin_select_cpu(const at::Tensor& z, const at::Tensor& token_mask, int64_t k) {
  const at::Tensor mask = check_token_mask(z, token_mask, "griffin_select");
  const at::Tensor zc = z.contiguous();
  const int64_t batch = zc.size(0), seq = zc.size(1), width = zc.size(2);
  TORCH_CHECK(k >= 1 && k <= width, "caprese_cpu::griffin_select: k must lie in [1, ", width, "], got ", k);
  const auto tokens = real_tokens(mask);
  at::Tensor score = at::zeros({batch, width}, zc.options().dtype(at::kFloat));
  at::Tensor keep = at::zeros({batch, 1, width}, zc.options().dtype(at::kBool));
  float* sc = score.data_ptr<float>();
  bool* kp = keep.data_ptr<bool>();
  with_dtype(zc.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* base = zc.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const auto& pos = tokens[b];
      const int64_t count = static_cast<int64_t>(pos.size());
      const scalar_t* row = base + b * seq * width;
      // a prompt of a few hundred tokens is done before a second thread would have started
      const int64_t grain = count * width < (1 << 20) ? std::max<int64_t>(count, width) : 16;
      std::vector<float> weight(count);
      at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const scalar_t* zt = row + pos[t] * width;
          Vec acc = vzero();
          int64_t j = 0;
          for (; j + kWidth <= width; j += kWidth) {
            const Vec v = vload(zt + j);
            acc = vfma(v, v, acc);
          }
          float sum = vsum(acc);
          for (; j < width; ++j) sum += static_cast<float>(zt[j]) * static_cast<float>(zt[j]);
          weight[t] = 1.0f / std::max(sum, std::numeric_limits<float>::min());
        }
      });
      float* s = sc + b * width;
      // columns split among threads, each walking every token over its columns
      at::parallel_for(0, width, grain == 16 ? 256 : width, [&](int64_t begin, int64_t end) {
        for (int64_t t = 0; t < count; ++t) {
          const scalar_t* zt = row + pos[t] * width;
          const Vec w = vset1(weight[t]);
          int64_t j = begin;
          for (; j + kWidth <= end; j += kWidth) {
            const Vec v = vload(zt + j);
            vstore(s + j, vfma(vmul(w, v), v, vload(s + j)));
          }
          for (; j < end; ++j) s[j] += weight[t] * static_cast<float>(zt[j]) * static_cast<float>(zt[j]);
        }
        for (int64_t j = begin; j < end; ++j) s[j] = std::sqrt(s[j]);
      });
      // scores are >= 0 or NaN, so their bit patterns sort as they do (a NaN highest, as in torch.topk); the key
      // puts the neuron's complement below them: equal scores rank the lower neuron higher
      std::vector<uint64_t> key(width);
      for (int64_t j = 0; j < width; ++j) {
        uint32_t bits;
        std::memcpy(&bits, s + j, sizeof(bits));
        key[j] = (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(j));
      }
      std::nth_element(key.begin(), key.begin() + (k - 1), key.end(), std::greater<uint64_t>());
      for (int64_t j = 0; j < k; ++j) kp[b * width + (0xFFFFFFFFu - static_cast<uint32_t>(key[j]))] = true;
    }
  });
  return {score, keep};
}

std::string isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY(caprese_cpu, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def(
      "gated_ff(Tensor x, Tensor gate, Tensor up, Tensor low_up, Tensor down_t, Tensor low_down, Tensor? threshold, "
      "Tensor? keep, str activation, Tensor? stand_up=None, Tensor? stand_down=None, Tensor? stand_scale=None, "
      "Tensor? stand_gate=None) -> Tensor");
  m.def("cats_threshold(Tensor gate, Tensor token_mask, Tensor draws, int sample, float density) -> Tensor");
  m.def("griffin_select(Tensor z, Tensor token_mask, int k) -> (Tensor, Tensor)");
  m.def(
      "attention_block(Tensor h, Tensor positions, int slot, Tensor norm_weight, float eps, Tensor qkv, "
      "Tensor? qkv_bias, Tensor? q_norm, Tensor? k_norm, float qk_eps, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor prompt_visible, int prompt_width, Tensor o, Tensor? o_bias, int heads, "
      "float scaling) -> Tensor");
  m.def(
      "ff_block(Tensor h, Tensor norm_weight, float eps, Tensor gate, Tensor up, Tensor low_up, Tensor down_t, "
      "Tensor low_down, Tensor? threshold, Tensor? keep, str activation, Tensor? stand_up=None, "
      "Tensor? stand_down=None, Tensor? stand_scale=None, Tensor? stand_gate=None) -> Tensor");
  m.def("norm_linear(Tensor h, Tensor norm_weight, float eps, Tensor weight) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(caprese_cpu, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("gated_ff", &gated_ff_cpu);
  m.impl("cats_threshold", &cats_threshold_cpu);
  m.impl("griffin_select", &griffin_select_cpu);
  m.impl("attention_block", &attention_block_cpu);
  m.impl("ff_block", &ff_block_cpu);
  m.impl("norm_linear", &norm_linear_cpu);
}
