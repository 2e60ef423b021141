// Decode attention over the paged KV cache on x86 CPUs (AVX2, FMA): every sequence of a step
// that decodes one token, all heads, in one call, reading the cache in place through the
// block tables (no gather, no per-sequence launch).
//
// One task per (sequence, kv head) computes the group of query heads that share that kv head:
// scores = scale * q . k for each context position, softmax in fp32 with the max subtracted,
// out = sum p * v. A task touches only its own sequence, so a sequence's output is bitwise the
// same whatever else is in the batch.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "nibble_cpu.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The `group` query heads q[0..group) sharing one kv head, over `ctx` positions.
__attribute__((target("avx2,fma"))) void attend(const float* q, int64_t q_head_stride,
                                                const float* k, const float* v,
                                                int64_t slot_stride, const int32_t* table,
                                                int64_t ctx, int64_t block_size, int64_t D,
                                                int64_t group, float scale, float* out,
                                                int64_t out_head_stride,
                                                std::vector<float>& scores) {
  scores.resize(group * ((ctx + 7) / 8 * 8));
  const int64_t width = (ctx + 7) / 8 * 8;
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores.data() + h * width;
    const float* qh = q + h * q_head_stride;
    for (int64_t t = 0; t < ctx; ++t) {
      const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
      const float* kt = k + slot * slot_stride;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kt + d), acc);
      s[t] = hsum(acc) * scale;
    }
    float mx = -INFINITY;
    for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, s[t]);
    for (int64_t t = ctx; t < width; ++t) s[t] = -INFINITY;
    __m256 sum8 = _mm256_setzero_ps();
    const __m256 m8 = _mm256_set1_ps(mx);
    for (int64_t t = 0; t < width; t += 8) {
      const __m256 e = nibble::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
      _mm256_storeu_ps(s + t, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    const float inv = 1.0f / hsum(sum8);
    float* oh = out + h * out_head_stride;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(oh + d, _mm256_setzero_ps());
    for (int64_t t = 0; t < ctx; ++t) {
      const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
      const float* vt = v + slot * slot_stride;
      const __m256 p = _mm256_set1_ps(s[t]);
      for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(oh + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + d),
                                                 _mm256_loadu_ps(oh + d)));
    }
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(oh + d, _mm256_mul_ps(_mm256_loadu_ps(oh + d), inv8));
  }
}

}  // namespace

// q [B, H, D] float32 (D contiguous), k_cache / v_cache [slots, Hkv, D] float32 (D
// contiguous, any slot and head strides), block_tables int32 [B, max_blocks], context_lens
// int32 [B] -> [B, H, D] float32.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && k_cache.dtype() == at::kFloat &&
                  v_cache.dtype() == at::kFloat, "float32 q and caches");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && k_cache.stride(2) == 1 &&
                  v_cache.stride(2) == 1 && k_cache.strides() == v_cache.strides(),
              "head_dim must be contiguous, k and v caches laid out alike");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(D % 8 == 0 && H % Hkv == 0 && k_cache.size(2) == D, "D % 8 == 0, H % Hkv == 0");
  TORCH_CHECK(block_tables.dtype() == at::kInt && context_lens.dtype() == at::kInt &&
                  block_tables.is_contiguous() && context_lens.is_contiguous() &&
                  block_tables.size(0) == B && context_lens.size(0) == B,
              "int32 contiguous block_tables [B, max_blocks] and context_lens [B]");
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "bad context length");
  at::Tensor out = at::empty({B, H, D}, q.options());
  nibble::decode_attention(q.data_ptr<float>(), q.stride(0), q.stride(1),
                           k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                           k_cache.stride(0), k_cache.stride(1), block_tables.data_ptr<int32_t>(),
                           max_blocks, lens, B, H, Hkv, D, block_size, static_cast<float>(scale),
                           out.data_ptr<float>());
  return out;
}

void nibble::decode_attention(const float* qp, int64_t qs0, int64_t qs1, const float* kp,
                              const float* vp, int64_t slot_stride, int64_t head_stride,
                              const int32_t* tp, int64_t max_blocks, const int32_t* lens,
                              int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                              float scale, float* op) {
  const int64_t group = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, kvh = i % Hkv;
      attend(qp + b * qs0 + kvh * group * qs1, qs1, kp + kvh * head_stride,
             vp + kvh * head_stride, slot_stride, tp + b * max_blocks, lens[b], block_size, D,
             group, scale, op + (b * H + kvh * group) * D, D, scores);
    }
  });
}
