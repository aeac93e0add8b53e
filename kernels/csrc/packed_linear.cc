// y[M, N] = x[M, K] @ W[K, N] against W packed once into 16-column strips ([N / 16, K, 16]).
//
// Why: Paddle's CPU matmul packs W on every call once M >= 2, so a decode step that scores 1 + k
// rows (speculative verification) or a small batch pays for W's traffic twice over and then some;
// in the demo model one extra row costs about as much as the first. Here W is packed when the
// model is loaded, each strip is streamed once per group of rows (one 64-byte line per k), and the
// rows of a group share every load: 2-4 rows cost about what 1 does. A single row takes eight strips
// per pass instead (row_strips_avx512), so that it is not one chain of dependent multiply-adds.
//
// Every output element is accumulated in the same order (k = 0 .. K-1, one fused multiply-add per
// k) whatever M is and whichever instruction set runs, so a row's result does not depend on the
// other rows in the call: batch-invariant, bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace {

constexpr int64_t kStrip = 16;

// Weights are float32, or bfloat16 (the upper 16 bits of a float32) when the loader found every
// value exactly representable: half the traffic, and widening is exact, so the products and sums
// are the same bits as with the float32 copy.
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx512f"))) inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* w) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rows r < R of x against one strip, with 256-bit registers (two per row: 16 columns).
template <int R, typename W>
void strip_avx2(const float* x, int64_t ldx, const W* strip, float* out, int64_t ldo, int64_t K) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = load8(strip + kStrip * k);
    const __m256 w1 = load8(strip + kStrip * k + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      lo[r] = _mm256_fmadd_ps(xb, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xb, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * ldo, lo[r]);
    _mm256_storeu_ps(out + r * ldo + 8, hi[r]);
  }
}

// The same with 512-bit registers (one per row), so 8 rows share a pass over the strip.
template <int R, typename W>
__attribute__((target("avx512f"))) void strip_avx512(const float* x, int64_t ldx, const W* strip,
                                                     float* out, int64_t ldo, int64_t K) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w = load16(strip + kStrip * k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), w, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

// One row against S adjacent strips (strip s at strips + s * K * 16). One row against one strip is a
// single chain of fused multiply-adds, each waiting on the last (4 cycles), while a core can start
// two a cycle: a one-row call ran at an eighth of the core's rate. S = 8 chains fill it. Each output
// is still summed over k = 0 .. K-1 in order: the same bits as one strip at a time.
template <int S, typename W>
__attribute__((target("avx512f"))) void row_strips_avx512(const float* x, const W* strips, float* out,
                                                          int64_t K) {
  __m512 acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 xb = _mm512_set1_ps(x[k]);
    for (int s = 0; s < S; ++s)
      acc[s] = _mm512_fmadd_ps(xb, load16(strips + s * K * kStrip + kStrip * k), acc[s]);
  }
  for (int s = 0; s < S; ++s) _mm512_storeu_ps(out + s * kStrip, acc[s]);
}

template <typename W>
using StripFn = void (*)(const float*, int64_t, const W*, float*, int64_t, int64_t);

template <typename W>
void packed_matmul(const float* x, const W* packed, float* out, int64_t M, int64_t K, int64_t N) {
  static constexpr StripFn<W> kAvx2[] = {nullptr, strip_avx2<1, W>, strip_avx2<2, W>, strip_avx2<3, W>,
                                         strip_avx2<4, W>};
  static constexpr StripFn<W> kAvx512[] = {nullptr,             strip_avx512<1, W>, strip_avx512<2, W>,
                                           strip_avx512<3, W>,  strip_avx512<4, W>, strip_avx512<5, W>,
                                           strip_avx512<6, W>,  strip_avx512<7, W>, strip_avx512<8, W>};
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const int64_t num_strips = N / kStrip;
  int64_t first = 0;  // strips before this are done
  if (avx512 && M == 1) {
    // Why only one row: taking several strips per pass for groups of 2-8 rows as well (already
    // 2-8 chains) was faster in a hot loop but slower in the engine, where the weights stream from
    // L3 or memory (docs/benchmarks.md); for one row it is ~10% of a batch-1 decode step.
    constexpr int kRowStrips = 8;
    for (; first + kRowStrips <= num_strips; first += kRowStrips)
      row_strips_avx512<kRowStrips>(x, packed + first * K * kStrip, out + first * kStrip, K);
  }
  const StripFn<W>* kernels = avx512 ? kAvx512 : kAvx2;
  const int64_t group = avx512 ? 8 : 4;
  for (int64_t s = first; s < num_strips; ++s) {
    const W* strip = packed + s * K * kStrip;
    for (int64_t m0 = 0; m0 < M; m0 += group) {
      const int64_t rows = std::min(group, M - m0);
      kernels[rows](x + m0 * K, K, strip, out + m0 * N + s * kStrip, N, K);
    }
  }
}

}  // namespace

std::vector<paddle::Tensor> PackedLinear(const paddle::Tensor& x, const paddle::Tensor& packed) {
  PD_CHECK(x.is_cpu() && packed.is_cpu(), "packed_linear runs on CPU tensors");
  const bool bf16 = packed.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && (bf16 || packed.dtype() == paddle::DataType::FLOAT32),
           "packed_linear takes float32 x and float32 or bfloat16 packed weights");
  PD_CHECK(x.shape().size() == 2 && packed.shape().size() == 3 && packed.shape()[2] == kStrip &&
               x.shape()[1] == packed.shape()[1],
           "packed_linear takes x [M, K] and packed weights [N / 16, K, 16]");
  const int64_t M = x.shape()[0], K = x.shape()[1], N = packed.shape()[0] * kStrip;
  auto out = paddle::empty({M, N}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  if (bf16) {
    const auto* weights = reinterpret_cast<const uint16_t*>(packed.data<paddle::bfloat16>());
    packed_matmul(x.data<float>(), weights, out.data<float>(), M, K, N);
  } else {
    packed_matmul(x.data<float>(), packed.data<float>(), out.data<float>(), M, K, N);
  }
  return {out};
}

PD_BUILD_OP(pdserve_packed_linear)
    .Inputs({"X", "Packed"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(PackedLinear));
