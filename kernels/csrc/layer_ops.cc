// A decoder layer's small ops on CPU, each one call instead of a chain of Paddle element-wise ops.
//
// Why: at decode sizes (1 to ~100 rows of a 256-wide model) Paddle's CPU ops cost their dispatch,
// and its element-wise ops that broadcast ([T, H] * [T, 1] in RMSNorm, [T, heads, D] * [T, 1, D]
// in RoPE) take a slow path whose cost grows with the rows: on Paddle's ops a 6-row verification
// step pays ~1.5x a 1-row step in every norm, RoPE and attention call (the demo model, 1 thread:
// RMSNorm 29 -> 46 us, RoPE 39 -> 56 us, paged attention 82 -> 146 us for 1 -> 6 rows).
//
// The attention is vectorized and shares its loads: a sequence's rows and a GQA group's query heads
// all read the same keys and values (each key 12 times for 6 rows of 2 heads if every (row, head)
// loaded its own), so each key is loaded for two queries at a time and each value for three, with
// the accumulators kept in registers and every sum in a fixed order (the same bits as one query
// alone). With AVX-512 the exp and the weighted sum run on 16 lanes, each lane doing what the
// 8-lane code does for its column (the same bits again), and each value chunk is loaded once for
// six queries. On 8 lanes a 6-row verification over 120 cached tokens takes 23 us and one row 9.4,
// against 89 and 29 with scalar loops (a float sum the compiler may not reorder); the 16 lanes
// take a 500-token prefill's attention to 2.04 ms from 2.85 on 8.
//
// Each op computes every output row from that row's inputs alone, in a fixed order, so a row's
// result is the same bits whatever else is in the batch (as kernels/csrc/packed_linear.cc).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "paddle/extension.h"

namespace {

void check_cpu_f32(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32, what, " must be a float32 CPU tensor");
}

void check_cpu_i64(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::INT64, what, " must be an int64 CPU tensor");
}

// One query of PagedAttention: a (row, query head) of a sequence, with its share of the work space.
struct Query {
  const float* query;  // head_dim floats
  float* scores;       // its scores, then its weights: context_len rounded up to a multiple of 8
  int64_t visible;     // it sees keys 0 .. visible - 1
  float inverse_sum;   // 1 / the sum of its weights
  float* out;          // head_dim floats
};

// The scores of N queries against the same four keys p .. p + 3, into each one's scores[p, p + 4):
// scale * (query . key), each summed the same way: 8 lanes across head_dim (lane l takes the
// elements i = l mod 8, the last partial chunk masked), then the lanes pairwise in a fixed tree. A
// (query, key) score is the same bits in whichever group of four keys and beside whichever queries
// it is computed, and four independent chains per query keep the FMA unit busy where one key at a
// time would wait on its latency.
//
// Why N queries: the rows of a verification or prefill and the query heads of a GQA group read the
// same keys; each key chunk is loaded once for all N instead of once each. N = 2 keeps the 8
// accumulators, 2 query chunks and a key chunk within AVX2's 16 registers.
template <int N>
inline void scores4(const Query* queries, const float* const* keys, int64_t p, int64_t dim, __m256i tail_mask,
                    float scale) {
  __m256 acc[N][4];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < 4; ++k) acc[n][k] = _mm256_setzero_ps();
  auto accumulate = [&](int64_t i, auto load) {
    __m256 query[N];
    for (int n = 0; n < N; ++n) query[n] = load(queries[n].query + i);
    for (int k = 0; k < 4; ++k) {
      const __m256 key = load(keys[k] + i);
      for (int n = 0; n < N; ++n) acc[n][k] = _mm256_fmadd_ps(query[n], key, acc[n][k]);
    }
  };
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) accumulate(i, [](const float* at) { return _mm256_loadu_ps(at); });
  if (i < dim) accumulate(i, [&](const float* at) { return _mm256_maskload_ps(at, tail_mask); });
  for (int n = 0; n < N; ++n) {
    // hadd twice: lane k of each 128-bit half holds key k's sum over that half's 4 lanes.
    const __m256 sums =
        _mm256_hadd_ps(_mm256_hadd_ps(acc[n][0], acc[n][1]), _mm256_hadd_ps(acc[n][2], acc[n][3]));
    const __m128 dots = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
    _mm_storeu_ps(queries[n].scores + p, _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
}

// exp(x) on 8 lanes for x <= 0 (a score minus its row's max): Cody-Waite range reduction and the
// Cephes expf polynomial, within ~2 ulp of std::exp. Inputs are clamped at -87 (~1e-38 out), where
// std::exp would give a denormal or 0; either is nothing next to the max's weight of 1.
// The constants of both widths (exp_nonpositive16 must compute the same bits).
constexpr float kExpFloor = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 = high + low (Cody-Waite)
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};  // highest first

inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpFloor));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 poly = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

// One float from 8 lanes, combined pairwise in a fixed order; op is _mm_max_ps or _mm_add_ps.
template <typename Op>
float reduce8(__m256 v, Op op) {
  __m128 half = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = op(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(op(half, _mm_shuffle_ps(half, half, 1)));
}

// exp_nonpositive on 16 lanes (AVX-512): the same operations lane by lane, so the same bits.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 poly = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  const __m512i two_n = _mm512_slli_epi32(biased, 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(two_n));
}

// scores[p] = exp(scores[p] - top) for p in [0, whole 16-float chunks of padded); returns where it
// stopped (the 8-lane loop does the rest). Half the instructions of the 8-lane exp for long rows.
__attribute__((target("avx512f"))) int64_t exp16_run(float* scores, int64_t padded, float top) {
  const __m512 top16 = _mm512_set1_ps(top);
  int64_t p = 0;
  for (; p + 16 <= padded; p += 16)
    _mm512_storeu_ps(scores + p, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(scores + p), top16)));
  return p;
}

// scores[0, n) -> exp(score - max score); returns their sum. scores must have room up to the next
// multiple of 8, which this sets to 0. Summed on 8 lanes then pairwise, in an order fixed by n.
float exp_and_sum(float* scores, int64_t n) {
  const int64_t padded = (n + 7) / 8 * 8;
  std::fill(scores + n, scores + padded, -INFINITY);
  __m256 best = _mm256_set1_ps(-INFINITY);
  for (int64_t p = 0; p < padded; p += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(scores + p));
  const float top_score = reduce8(best, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
  const __m256 top = _mm256_set1_ps(top_score);
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  int64_t p = avx512 ? exp16_run(scores, padded, top_score) : 0;
  for (; p < padded; p += 8)
    _mm256_storeu_ps(scores + p, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + p), top)));
  std::fill(scores + n, scores + padded, 0.f);  // the padding's lanes came out ~1e-38, not 0
  __m256 sum = _mm256_setzero_ps();
  for (int64_t p = 0; p < padded; p += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(scores + p));
  return reduce8(sum, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
}

// out[i, i + 8) = inverse_sum * sum_p weights[p] * values[p][i, i + 8) over the visible p, for N
// queries (weights: their scores after exp_and_sum; values[p] = base + offsets[p]), a masked
// partial chunk of 8 columns unless Full. Each query's keys go round its own four accumulators (key p
// into accumulator p mod 4, in key order), added pairwise at the end: an order fixed by its visible
// count alone. The keys all N queries see are loaded once for all of them (as in scores4); N = 3
// keeps 12 accumulators, a value and a weight in registers.
template <int N, bool Full>
inline void weighted_chunk(const Query* queries, const float* base, const int64_t* offsets, int64_t i,
                           __m256i tail_mask) {
  auto load = [&](int64_t p) {
    const float* at = base + offsets[p] + i;
    return Full ? _mm256_loadu_ps(at) : _mm256_maskload_ps(at, tail_mask);
  };
  auto weight = [&](int n, int64_t p) { return _mm256_set1_ps(queries[n].scores[p]); };
  __m256 acc[N][4];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < 4; ++k) acc[n][k] = _mm256_setzero_ps();
  const int64_t shared = queries[0].visible / 4 * 4;  // the first sees the fewest keys (see attend)
  for (int64_t p = 0; p < shared; p += 4)
    for (int k = 0; k < 4; ++k) {
      const __m256 value = load(p + k);
      for (int n = 0; n < N; ++n) acc[n][k] = _mm256_fmadd_ps(weight(n, p + k), value, acc[n][k]);
    }
  // The keys past the shared groups of four, each query alone. Unrolled so that acc is only indexed
  // by constants: a loop over n would keep it in memory, a store after every FMA.
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    const int64_t visible = queries[n].visible;
    int64_t p = shared;
    for (; p + 4 <= visible; p += 4)
      for (int k = 0; k < 4; ++k) acc[n][k] = _mm256_fmadd_ps(weight(n, p + k), load(p + k), acc[n][k]);
    for (int k = 0; k < 3; ++k)
      if (p + k < visible) acc[n][k] = _mm256_fmadd_ps(weight(n, p + k), load(p + k), acc[n][k]);
    const __m256 total = _mm256_add_ps(_mm256_add_ps(acc[n][0], acc[n][1]), _mm256_add_ps(acc[n][2], acc[n][3]));
    const __m256 sum = _mm256_mul_ps(total, _mm256_set1_ps(queries[n].inverse_sum));
    if (Full) {
      _mm256_storeu_ps(queries[n].out + i, sum);
    } else {
      _mm256_maskstore_ps(queries[n].out + i, tail_mask, sum);
    }
  }
}

// weighted_chunk on 16 columns with AVX-512, for up to 6 queries at once: every lane runs exactly
// the 8-lane version's operations for its column (key p into accumulator p mod 4 in key order, the
// same pairwise total, the same scaling), so the outputs are the same bits; a value chunk is loaded
// once for six queries instead of three, and a multiply-add covers 16 columns instead of 8. On 8
// lanes the weighted sum is ~40% of a 500-token prefill's attention. No lambdas: they would not
// inherit the target attribute.
template <int N, bool Full>
__attribute__((target("avx512f"))) void weighted_chunk16(const Query* queries, const float* base,
                                                         const int64_t* offsets, int64_t i, __mmask16 tail) {
  __m512 acc[N][4];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < 4; ++k) acc[n][k] = _mm512_setzero_ps();
  const int64_t shared = queries[0].visible / 4 * 4;  // the first sees the fewest keys (see attend)
  for (int64_t p = 0; p < shared; p += 4)
    for (int k = 0; k < 4; ++k) {
      const float* at = base + offsets[p + k] + i;
      const __m512 value = Full ? _mm512_loadu_ps(at) : _mm512_maskz_loadu_ps(tail, at);
      for (int n = 0; n < N; ++n)
        acc[n][k] = _mm512_fmadd_ps(_mm512_set1_ps(queries[n].scores[p + k]), value, acc[n][k]);
    }
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) {
    const int64_t visible = queries[n].visible;
    const float* scores = queries[n].scores;
    int64_t p = shared;
    for (; p + 4 <= visible; p += 4)
      for (int k = 0; k < 4; ++k) {
        const float* at = base + offsets[p + k] + i;
        const __m512 value = Full ? _mm512_loadu_ps(at) : _mm512_maskz_loadu_ps(tail, at);
        acc[n][k] = _mm512_fmadd_ps(_mm512_set1_ps(scores[p + k]), value, acc[n][k]);
      }
    for (int k = 0; k < 3; ++k)
      if (p + k < visible) {
        const float* at = base + offsets[p + k] + i;
        const __m512 value = Full ? _mm512_loadu_ps(at) : _mm512_maskz_loadu_ps(tail, at);
        acc[n][k] = _mm512_fmadd_ps(_mm512_set1_ps(scores[p + k]), value, acc[n][k]);
      }
    const __m512 total =
        _mm512_add_ps(_mm512_add_ps(acc[n][0], acc[n][1]), _mm512_add_ps(acc[n][2], acc[n][3]));
    const __m512 sum = _mm512_mul_ps(total, _mm512_set1_ps(queries[n].inverse_sum));
    if (Full) {
      _mm512_storeu_ps(queries[n].out + i, sum);
    } else {
      _mm512_mask_storeu_ps(queries[n].out + i, tail, sum);
    }
  }
}

template <int N>
__attribute__((target("avx512f"))) void weighted_avx512(const Query* queries, const float* values,
                                                        const int64_t* offsets, int64_t dim) {
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16) weighted_chunk16<N, true>(queries, values, offsets, i, 0);
  if (i < dim) {
    const auto tail = static_cast<__mmask16>((1u << (dim - i)) - 1);
    weighted_chunk16<N, false>(queries, values, offsets, i, tail);
  }
}

// Calls f(std::integral_constant<int, n>{}) for n = min(left, Max), left >= 1; returns n. It picks
// how many of the queries left the next scores4 or weighted_chunk takes.
template <int Max, typename F>
int64_t take_up_to(int64_t left, F&& f) {
  if constexpr (Max > 1) {
    if (left < Max) return take_up_to<Max - 1>(left, f);
  }
  f(std::integral_constant<int, Max>{});
  return Max;
}

// Attention of count queries over one KV head's keys and values (position p at keys + offsets[p],
// values + offsets[p]). The queries are a sequence's rows in order, each row's heads of the group
// together, so each sees as many keys as the one before it or one more.
//
// Why this order: each group of four keys is loaded once for all the queries that see it (two at a
// time, in scores4), and each value once for three queries at a time, instead of once per query.
// Each query's own sums keep their order (see scores4 and weighted_chunk): the same bits as alone.
void attend(Query* queries, int64_t count, const float* keys, const float* values, const int64_t* offsets,
            int64_t dim, __m256i tail_mask, float scale) {
  const int64_t last_visible = queries[count - 1].visible;
  int64_t first = 0;  // the first query that sees key p
  for (int64_t p = 0; p < last_visible; p += 4) {
    while (queries[first].visible <= p) ++first;
    const float* four[4];
    for (int64_t k = 0; k < 4; ++k)  // past the last key, repeat it (its lanes are dropped)
      four[k] = keys + offsets[std::min(p + k, last_visible - 1)];
    // A query that sees fewer of the four keys scores the others too; exp_and_sum drops them.
    for (int64_t n = first; n < count;)
      n += take_up_to<2>(count - n, [&](auto m) { scores4<m>(queries + n, four, p, dim, tail_mask, scale); });
  }
  for (int64_t n = 0; n < count; ++n)
    queries[n].inverse_sum = 1.f / exp_and_sum(queries[n].scores, queries[n].visible);
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    for (int64_t n = 0; n < count;)
      n += take_up_to<6>(count - n, [&](auto m) { weighted_avx512<m>(queries + n, values, offsets, dim); });
    return;
  }
  for (int64_t n = 0; n < count;) {
    n += take_up_to<3>(count - n, [&](auto m) {
      int64_t i = 0;
      for (; i + 8 <= dim; i += 8) weighted_chunk<m, true>(queries + n, values, offsets, i, tail_mask);
      if (i < dim) weighted_chunk<m, false>(queries + n, values, offsets, i, tail_mask);
    });
  }
}

// PagedAttention takes a sequence's rows this many at a time: plenty to share each key among, and
// the scores stay kTileRows * group runs of the context however long the prefill.
constexpr int64_t kTileRows = 8;

}  // namespace

// Lanes 0 .. n % 8 - 1 set: the mask of a row's last partial chunk of 8 floats.
static __m256i tail_mask_of(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), in float32 as the reference (kernels/norm.py).
// The sum of squares runs on four 8-lane accumulators (element i into accumulator (i / 8) mod 4, in
// order), combined in a fixed tree: an order fixed by the width alone, so a row is the same bits in
// any batch. A scalar loop (a float sum the compiler may not reorder) costs 5-7 us a call in a step.
std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight, float eps) {
  check_cpu_f32(x, "x");
  check_cpu_f32(weight, "weight");
  PD_CHECK(x.shape().size() == 2 && weight.shape().size() == 1 && x.shape()[1] == weight.shape()[0],
           "rms_norm takes x [T, H] and weight [H]");
  const int64_t rows = x.shape()[0], width = x.shape()[1];
  auto out = paddle::empty({rows, width}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* w = weight.data<float>();
  const __m256i tail = tail_mask_of(width);
  const int64_t full = width / 8 * 8;
  for (int64_t t = 0; t < rows; ++t) {
    const float* row = x.data<float>() + t * width;
    float* o = out.data<float>() + t * width;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i < full; i += 8) {
      const __m256 v = _mm256_loadu_ps(row + i);
      acc[(i / 8) % 4] = _mm256_fmadd_ps(v, v, acc[(i / 8) % 4]);
    }
    if (i < width) {
      const __m256 v = _mm256_maskload_ps(row + i, tail);
      acc[(i / 8) % 4] = _mm256_fmadd_ps(v, v, acc[(i / 8) % 4]);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    const float total = reduce8(sum, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
    const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(total / static_cast<float>(width) + eps));
    for (i = 0; i < full; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(row + i), inv)));
    if (i < width) {
      const __m256 v = _mm256_mul_ps(_mm256_maskload_ps(row + i, tail), inv);
      _mm256_maskstore_ps(o + i, tail, _mm256_mul_ps(_mm256_maskload_ps(w + i, tail), v));
    }
  }
  return {out};
}

// SwiGLU's activation on the fused gate/up projection: gate_up [T, 2I] = [gate | up] ->
// silu(gate) * up [T, I], silu(g) = g * sigmoid(g). One call instead of Paddle's chunk, silu and
// multiply (three dispatches, ~15 us of a layer at decode sizes).
//
// sigmoid from e = exp(-|g|), which never overflows: 1 / (1 + e) for g >= 0, e / (1 + e) below.
// Element-wise with one formula for every lane (the last partial chunk masked), so a row is the
// same bits in any batch; within ~3 ulp of the reference.
std::vector<paddle::Tensor> SiluAndMul(const paddle::Tensor& gate_up) {
  check_cpu_f32(gate_up, "gate_up");
  PD_CHECK(gate_up.shape().size() == 2 && gate_up.shape()[1] % 2 == 0,
           "silu_and_mul takes gate_up [T, 2 * intermediate]");
  const int64_t rows = gate_up.shape()[0], width = gate_up.shape()[1] / 2;
  auto out = paddle::empty({rows, width}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const __m256i tail = tail_mask_of(width);
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  auto silu_mul = [&](__m256 g, __m256 u) {
    const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));  // exp(-|g|)
    const __m256 numerator = _mm256_blendv_ps(one, e, g);      // the sign bit of g picks e
    const __m256 sigmoid = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
    return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u);
  };
  for (int64_t t = 0; t < rows; ++t) {
    const float* gate = gate_up.data<float>() + t * 2 * width;
    const float* up = gate + width;
    float* o = out.data<float>() + t * width;
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
      _mm256_storeu_ps(o + i, silu_mul(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    if (i < width)
      _mm256_maskstore_ps(o + i, tail,
                          silu_mul(_mm256_maskload_ps(gate + i, tail), _mm256_maskload_ps(up + i, tail)));
  }
  return {out};
}

// The fused qkv projection's output [T, (Hq + 2 Hkv) * D] -> q [T, Hq, D] and k [T, Hkv, D] with
// RoPE applied (HF rotate_half: x * cos + rotate_half(x) * sin), and v [T, Hkv, D] as is.
std::vector<paddle::Tensor> RopeQkv(const paddle::Tensor& qkv, const paddle::Tensor& cos,
                                    const paddle::Tensor& sin, int64_t num_heads, int64_t num_kv_heads) {
  check_cpu_f32(qkv, "qkv");
  check_cpu_f32(cos, "cos");
  check_cpu_f32(sin, "sin");
  PD_CHECK(qkv.shape().size() == 2 && cos.shape().size() == 2 && cos.shape() == sin.shape(),
           "rope_qkv takes qkv [T, (Hq + 2 Hkv) * D] and cos, sin [T, D]");
  const int64_t rows = qkv.shape()[0], dim = cos.shape()[1], half = dim / 2;
  const int64_t width = (num_heads + 2 * num_kv_heads) * dim;
  PD_CHECK(dim % 2 == 0 && qkv.shape()[1] == width && cos.shape()[0] == rows,
           "rope_qkv: qkv width must be (Hq + 2 Hkv) * D with one cos/sin row per token");
  auto q = paddle::empty({rows, num_heads, dim}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto k = paddle::empty({rows, num_kv_heads, dim}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto v = paddle::empty({rows, num_kv_heads, dim}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* in = qkv.data<float>();
  float* outs[2] = {q.data<float>(), k.data<float>()};
  const int64_t heads[2] = {num_heads, num_kv_heads};
  for (int64_t t = 0; t < rows; ++t) {
    const float* c = cos.data<float>() + t * dim;
    const float* s = sin.data<float>() + t * dim;
    const float* src = in + t * width;
    for (int part = 0; part < 2; ++part) {
      for (int64_t h = 0; h < heads[part]; ++h, src += dim) {
        float* dst = outs[part] + (t * heads[part] + h) * dim;
        for (int64_t i = 0; i < half; ++i) dst[i] = src[i] * c[i] + (-src[i + half]) * s[i];
        for (int64_t i = half; i < dim; ++i) dst[i] = src[i] * c[i] + src[i - half] * s[i];
      }
    }
    std::copy(src, src + num_kv_heads * dim, v.data<float>() + t * num_kv_heads * dim);
  }
  return {q, k, v};
}

// Writes the step's K/V into their cache slots, then causal GQA attention of q over each
// sequence's cached keys. The caches ([num_blocks, Hkv, block_size, D]) are written in place: they
// view the node's shared KV pool, which is what this op is for (as kernels/attention.py write_kv).
//
// seq_lens [S, 2] holds (query_len, context_len) per sequence, tokens grouped by sequence in order;
// query j of a sequence sits at position context_len - query_len + j and sees keys 0 .. position.
std::vector<paddle::Tensor> PagedAttention(const paddle::Tensor& q, const paddle::Tensor& k,
                                           const paddle::Tensor& v, const paddle::Tensor& k_cache,
                                           const paddle::Tensor& v_cache, const paddle::Tensor& slot_mapping,
                                           const paddle::Tensor& block_tables, const paddle::Tensor& seq_lens,
                                           float scale) {
  for (const auto* t : {&q, &k, &v, &k_cache, &v_cache}) check_cpu_f32(*t, "q, k, v and the caches");
  check_cpu_i64(slot_mapping, "slot_mapping");
  check_cpu_i64(block_tables, "block_tables");
  check_cpu_i64(seq_lens, "seq_lens");
  PD_CHECK(q.shape().size() == 3 && k.shape().size() == 3 && k.shape() == v.shape() &&
               k_cache.shape().size() == 4 && k_cache.shape() == v_cache.shape(),
           "paged_attention takes q [T, Hq, D], k, v [T, Hkv, D] and caches [blocks, Hkv, block_size, D]");
  const int64_t tokens = q.shape()[0], num_heads = q.shape()[1], dim = q.shape()[2];
  const int64_t num_blocks = k_cache.shape()[0], num_kv_heads = k_cache.shape()[1];
  const int64_t block_size = k_cache.shape()[2];
  PD_CHECK(k.shape()[0] == tokens && k.shape()[1] == num_kv_heads && k.shape()[2] == dim &&
               k_cache.shape()[3] == dim && num_heads % num_kv_heads == 0,
           "paged_attention: q, k, v and the caches disagree on tokens, heads or head_dim");
  PD_CHECK(slot_mapping.shape().size() == 1 && slot_mapping.shape()[0] == tokens,
           "paged_attention: slot_mapping needs one slot per token");
  const int64_t num_seqs = seq_lens.shape()[0], max_blocks = block_tables.shape()[1];
  PD_CHECK(seq_lens.shape().size() == 2 && seq_lens.shape()[1] == 2 && block_tables.shape().size() == 2 &&
               block_tables.shape()[0] == num_seqs,
           "paged_attention takes seq_lens [S, 2] and block_tables [S, max_blocks]");
  const int64_t* lens = seq_lens.data<int64_t>();
  const int64_t* tables = block_tables.data<int64_t>();
  int64_t total = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    PD_CHECK(1 <= lens[2 * s] && lens[2 * s] <= lens[2 * s + 1] && lens[2 * s + 1] <= max_blocks * block_size,
             "paged_attention: need 1 <= query_len <= context_len <= blocks * block_size");
    total += lens[2 * s];
  }
  PD_CHECK(total == tokens, "paged_attention: the query lengths must sum to the tokens");
  const int64_t slots = num_blocks * block_size;
  // Where the head_dim values of (block, kv head, offset in the block) start in either cache.
  auto cache_at = [&](int64_t block, int64_t kv_head, int64_t offset) {
    return ((block * num_kv_heads + kv_head) * block_size + offset) * dim;
  };

  // The caches view memory the op does not own as outputs; Paddle hands the same buffer in.
  auto* kc = const_cast<float*>(k_cache.data<float>());
  auto* vc = const_cast<float*>(v_cache.data<float>());
  const int64_t* slot = slot_mapping.data<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    PD_CHECK(0 <= slot[t] && slot[t] < slots, "paged_attention: slot out of range");
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t at = cache_at(slot[t] / block_size, h, slot[t] % block_size);
      std::copy_n(k.data<float>() + (t * num_kv_heads + h) * dim, dim, kc + at);
      std::copy_n(v.data<float>() + (t * num_kv_heads + h) * dim, dim, vc + at);
    }
  }

  auto out = paddle::empty({tokens, num_heads, dim}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t group = num_heads / num_kv_heads;
  const __m256i tail_mask = tail_mask_of(dim);  // the last partial chunk of head_dim
  std::vector<int64_t> offsets;  // cache_at(.., kv head 0, ..) of each position: no divisions per key
  std::vector<float> scores;
  std::vector<Query> queries(kTileRows * group);
  int64_t row = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = lens[2 * s], context_len = lens[2 * s + 1];
    const int64_t* table = tables + s * max_blocks;
    for (int64_t b = 0; b < (context_len + block_size - 1) / block_size; ++b)
      PD_CHECK(0 <= table[b] && table[b] < num_blocks, "paged_attention: block id out of range");
    offsets.resize(context_len);
    for (int64_t p = 0; p < context_len; ++p) offsets[p] = cache_at(table[p / block_size], 0, p % block_size);
    const int64_t run = (context_len + 7) / 8 * 8;  // room for the last group's unused lanes
    for (int64_t j0 = 0; j0 < query_len; j0 += kTileRows) {
      const int64_t count = std::min(kTileRows, query_len - j0) * group;
      scores.resize(count * run);
      for (int64_t g = 0; g < num_kv_heads; ++g) {
        for (int64_t n = 0; n < count; ++n) {  // row j0 + n / group, head g * group + n % group
          const int64_t j = j0 + n / group, at = ((row + j) * num_heads + g * group + n % group) * dim;
          queries[n] = {q.data<float>() + at, scores.data() + n * run, context_len - query_len + j + 1, 0.f,
                        out.data<float>() + at};
        }
        const int64_t head_offset = cache_at(0, g, 0);
        attend(queries.data(), count, kc + head_offset, vc + head_offset, offsets.data(), dim, tail_mask, scale);
      }
    }
    row += query_len;
  }
  return {out};
}

// kernels/csrc/packed_linear.cc, in the same library.
std::vector<paddle::Tensor> PackedLinear(const paddle::Tensor& x, const paddle::Tensor& packed);

// The MTP layer's input with eh_proj's token half folded into a table (models/mtp.py):
// hnorm(hidden) @ W_hidden + token_rows[next_token_ids], by the norm and projection ops above and
// below and the same float32 adds, so the same bits as calling them one by one. One call instead of
// a norm, a projection and a NumPy gather-and-add: ~45 us of a hybrid step in three Python-side
// calls. The ids come as an attribute: a [T] tensor would cost its own conversion per step.
std::vector<paddle::Tensor> MtpInput(const paddle::Tensor& hidden, const paddle::Tensor& hnorm_weight,
                                     const paddle::Tensor& packed, const paddle::Tensor& token_rows,
                                     const std::vector<int64_t>& next_token_ids, float eps) {
  check_cpu_f32(token_rows, "token_rows");
  auto out = PackedLinear(RmsNorm(hidden, hnorm_weight, eps)[0], packed)[0];
  const int64_t rows = out.shape()[0], width = out.shape()[1];
  PD_CHECK(token_rows.shape().size() == 2 && token_rows.shape()[1] == width &&
               static_cast<int64_t>(next_token_ids.size()) == rows,
           "mtp_input takes token_rows [V, H] (H the projection's width) and one token id per row");
  const int64_t vocab = token_rows.shape()[0];
  const float* table = token_rows.data<float>();
  float* o = out.data<float>();
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t id = next_token_ids[t];
    PD_CHECK(0 <= id && id < vocab, "mtp_input: token id out of range");
    for (int64_t i = 0; i < width; ++i) o[t * width + i] += table[id * width + i];
  }
  return {out};
}

PD_BUILD_OP(pdserve_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNorm));

PD_BUILD_OP(pdserve_silu_and_mul)
    .Inputs({"GateUp"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SiluAndMul));

PD_BUILD_OP(pdserve_rope_qkv)
    .Inputs({"QKV", "Cos", "Sin"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"num_heads: int64_t", "num_kv_heads: int64_t"})
    .SetKernelFn(PD_KERNEL(RopeQkv));

PD_BUILD_OP(pdserve_paged_attention)
    .Inputs({"Q", "K", "V", "KCache", "VCache", "SlotMapping", "BlockTables", "SeqLens"})
    .Outputs({"Out"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(PagedAttention));

PD_BUILD_OP(pdserve_mtp_input)
    .Inputs({"Hidden", "HnormWeight", "Packed", "TokenRows"})
    .Outputs({"Out"})
    .Attrs({"next_token_ids: std::vector<int64_t>", "eps: float"})
    .SetKernelFn(PD_KERNEL(MtpInput));
