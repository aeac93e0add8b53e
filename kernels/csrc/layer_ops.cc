// A decoder layer's small ops on CPU, each one call instead of a chain of Paddle element-wise ops.
//
// Why: at decode sizes (1 to ~100 rows of a 256-wide model) Paddle's CPU ops cost their dispatch,
// and its element-wise ops that broadcast ([T, H] * [T, 1] in RMSNorm, [T, heads, D] * [T, 1, D]
// in RoPE) take a slow path whose cost grows with the rows: a 6-row verification step paid ~1.5x
// a 1-row step in every norm, RoPE and attention call. Measured on the demo model (1 thread):
// RMSNorm 29 -> 46 us, RoPE 39 -> 56 us, paged attention 82 -> 146 us for 1 -> 6 rows.
//
// Each op computes every output row from that row's inputs alone, in a fixed order, so a row's
// result is the same bits whatever else is in the batch (as kernels/csrc/packed_linear.cc).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace {

void check_cpu_f32(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32, what, " must be a float32 CPU tensor");
}

void check_cpu_i64(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::INT64, what, " must be an int64 CPU tensor");
}

}  // namespace

// out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), in float32 as the reference (kernels/norm.py).
std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight, float eps) {
  check_cpu_f32(x, "x");
  check_cpu_f32(weight, "weight");
  PD_CHECK(x.shape().size() == 2 && weight.shape().size() == 1 && x.shape()[1] == weight.shape()[0],
           "rms_norm takes x [T, H] and weight [H]");
  const int64_t rows = x.shape()[0], width = x.shape()[1];
  auto out = paddle::empty({rows, width}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* in = x.data<float>();
  const float* w = weight.data<float>();
  float* o = out.data<float>();
  for (int64_t t = 0; t < rows; ++t) {
    const float* row = in + t * width;
    float sum = 0.f;
    for (int64_t i = 0; i < width; ++i) sum += row[i] * row[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
    for (int64_t i = 0; i < width; ++i) o[t * width + i] = w[i] * (row[i] * inv);
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
  std::vector<float> scores;
  std::vector<float> acc(dim);
  int64_t row = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = lens[2 * s], context_len = lens[2 * s + 1];
    const int64_t* table = tables + s * max_blocks;
    for (int64_t b = 0; b < (context_len + block_size - 1) / block_size; ++b)
      PD_CHECK(0 <= table[b] && table[b] < num_blocks, "paged_attention: block id out of range");
    scores.resize(context_len);
    for (int64_t j = 0; j < query_len; ++j, ++row) {
      const int64_t visible = context_len - query_len + j + 1;
      for (int64_t h = 0; h < num_heads; ++h) {
        const int64_t kv_head = h / group;
        const float* query = q.data<float>() + (row * num_heads + h) * dim;
        float best = -INFINITY;
        for (int64_t p = 0; p < visible; ++p) {
          const float* key = kc + cache_at(table[p / block_size], kv_head, p % block_size);
          float dot = 0.f;
          for (int64_t i = 0; i < dim; ++i) dot += query[i] * key[i];
          scores[p] = dot * scale;
          best = std::max(best, scores[p]);
        }
        float denom = 0.f;
        for (int64_t p = 0; p < visible; ++p) {
          scores[p] = std::exp(scores[p] - best);
          denom += scores[p];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t p = 0; p < visible; ++p) {
          const float* value = vc + cache_at(table[p / block_size], kv_head, p % block_size);
          const float weight = scores[p];
          for (int64_t i = 0; i < dim; ++i) acc[i] += weight * value[i];
        }
        float* dst = out.data<float>() + (row * num_heads + h) * dim;
        const float inv = 1.f / denom;
        for (int64_t i = 0; i < dim; ++i) dst[i] = acc[i] * inv;
      }
    }
  }
  return {out};
}

PD_BUILD_OP(pdserve_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNorm));

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
