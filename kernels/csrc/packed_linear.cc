// y[M, N] = x[M, K] @ W[K, N] against W packed once into 16-column strips ([N / 16, K, 16]).
//
// Why: Paddle's CPU matmul packs W on every call once M >= 2, so a decode step that scores 1 + k
// rows (speculative verification) or a small batch pays for W's traffic twice over and then some;
// in the demo model one extra row costs about as much as the first. Here W is packed when the
// model is loaded, each strip is streamed once per group of rows, and the rows of a group share
// every load. A pass takes several strips at once (strips_avx512) so that it runs enough
// independent chains of multiply-adds to keep the core busy.
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

// R rows of x against S adjacent strips (strip s at strips + s * K * 16, its outputs at out + s * 16),
// with 512-bit registers. Every (row, strip) pair is its own chain of fused multiply-adds over k; a
// core starts two a cycle and each waits four cycles on the last, so a pass needs about 8 chains to
// keep the core busy: one row against one strip runs at an eighth of its rate. Each output is still
// summed over k = 0 .. K-1 in order, one multiply-add per k: the same bits for any R and S.
//
// The weights stream from L3 or memory in a decode step (a layer's are evicted by the others' before
// it runs again), so each strip is prefetched 2 KB ahead, on into the next pass's strips: in the
// engine the prefetch, more than the chains, is what makes passes of 2-6 rows fast, and one row's
// too (2 KB is the fastest distance measured: 1 KB and, for one row, 4 KB are slower).
template <int R, int S, typename W>
__attribute__((target("avx512f"))) void strips_avx512(const float* x, int64_t ldx, const W* strips,
                                                      float* out, int64_t ldo, int64_t K) {
  constexpr int64_t kPerLine = 64 / (kStrip * sizeof(W));  // k steps per 64-byte line of a strip
  constexpr int64_t kAhead = 2048 / (kStrip * sizeof(W));
  __m512 acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k % kPerLine == 0) {
      // Past its end, a strip's prefetch runs on into the strip the next pass reads in its place, so
      // that pass does not start on lines still in flight. On the last pass that points past the
      // weights: the address is computed as an integer, and a prefetch never faults.
      const int64_t ahead = k + kAhead < K ? kStrip * (k + kAhead) : kStrip * (S * K + k + kAhead - K);
      const auto base = reinterpret_cast<std::uintptr_t>(strips);
      for (int s = 0; s < S; ++s) {
        const auto line = base + (s * K * kStrip + ahead) * sizeof(W);
        _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
      }
    }
    __m512 xb[R];
    for (int r = 0; r < R; ++r) xb[r] = _mm512_set1_ps(x[r * ldx + k]);
    for (int s = 0; s < S; ++s) {
      const __m512 w = load16(strips + s * K * kStrip + kStrip * k);
      for (int r = 0; r < R; ++r) acc[r][s] = _mm512_fmadd_ps(xb[r], w, acc[r][s]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) _mm512_storeu_ps(out + r * ldo + s * kStrip, acc[r][s]);
}

template <typename W>
using StripFn = void (*)(const float*, int64_t, const W*, float*, int64_t, int64_t);

template <int S, typename W>
struct Avx512ByRows {  // strips_avx512<R, S> indexed by R = 1 .. 8
  static constexpr StripFn<W> kFns[] = {
      nullptr,                strips_avx512<1, S, W>, strips_avx512<2, S, W>,
      strips_avx512<3, S, W>, strips_avx512<4, S, W>, strips_avx512<5, S, W>,
      strips_avx512<6, S, W>, strips_avx512<7, S, W>, strips_avx512<8, S, W>};
};

// Strips per pass for a group of `rows` rows (8 at most). In the engine, 5-6 rows run faster on 4
// strips than on 1 (and slower on 2); 7-8 rows already run 7-8 chains with one strip.
constexpr int64_t strips_per_pass(int64_t rows) { return rows == 1 ? 8 : rows <= 6 ? 4 : 1; }

template <typename W>
void packed_matmul_avx512(const float* x, const W* packed, float* out, int64_t M, int64_t K, int64_t N) {
  constexpr int64_t group = 8;
  const int64_t num_strips = N / kStrip;
  // Every group passes over the strips the first group's way: only the last group can have fewer rows.
  const int64_t width = strips_per_pass(std::min(group, M));
  const StripFn<W>* wide = width == 8   ? Avx512ByRows<8, W>::kFns
                           : width == 4 ? Avx512ByRows<4, W>::kFns
                                        : Avx512ByRows<1, W>::kFns;
  const StripFn<W>* single = Avx512ByRows<1, W>::kFns;
  for (int64_t s = 0; s < num_strips; s += width) {
    const int64_t here = std::min(width, num_strips - s);
    for (int64_t m0 = 0; m0 < M; m0 += group) {
      const int64_t rows = std::min(group, M - m0);
      if (here == width) {
        wide[rows](x + m0 * K, K, packed + s * K * kStrip, out + m0 * N + s * kStrip, N, K);
      } else {  // the last few strips, one at a time
        for (int64_t t = s; t < s + here; ++t)
          single[rows](x + m0 * K, K, packed + t * K * kStrip, out + m0 * N + t * kStrip, N, K);
      }
    }
  }
}

template <typename W>
void packed_matmul(const float* x, const W* packed, float* out, int64_t M, int64_t K, int64_t N) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return packed_matmul_avx512(x, packed, out, M, K, N);
  static constexpr StripFn<W> kAvx2[] = {nullptr, strip_avx2<1, W>, strip_avx2<2, W>, strip_avx2<3, W>,
                                         strip_avx2<4, W>};
  constexpr int64_t group = 4;
  for (int64_t s = 0; s < N / kStrip; ++s) {
    const W* strip = packed + s * K * kStrip;
    for (int64_t m0 = 0; m0 < M; m0 += group) {
      const int64_t rows = std::min(group, M - m0);
      kAvx2[rows](x + m0 * K, K, strip, out + m0 * N + s * kStrip, N, K);
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
