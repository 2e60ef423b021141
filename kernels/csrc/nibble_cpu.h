// nibble's CPU kernels: the tensor entry points, and the raw cores they share with the fused
// decode step (llama_decode_cpu.cpp). Everything is float32, row-major, x86 AVX2 + FMA.
#pragma once

#include <torch/extension.h>

#include <immintrin.h>

#include <cstdint>
#include <vector>

// The tensor entry points (bindings.cpp exposes them to Python).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& bias, int64_t group_size, int64_t N, bool act8);
void int4_dequantize_t(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& bias,
                       int64_t group_size, at::Tensor& out);
at::Tensor int8_linear_act8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       double static_scale);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale);
at::Tensor llama_decode(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                        const std::vector<at::Tensor>& weights, const std::vector<int64_t>& groups,
                        const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, const at::Tensor& slots,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, double eps, double scale, bool act8);

namespace nibble {

// exp for x <= 0 (softmax after subtracting the max): 2^n * p(r), r in [-ln2/2, ln2/2], the
// degree-6 polynomial of Cephes' expf (relative error ~1e-7); below -87 it returns 0.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), zero_mask);
}

// 8-bit activations: each row of x [M, K] in blocks of kActBlock, a = max|x| / 127 (xa
// [M, K / kActBlock]) and xq = round(x / a) to nearest even; nibble_order stores each chunk of
// 8 as k = 0 2 4 6 1 3 5 7 (int4_cpu.cpp pairs them with a word's low and high nibbles).
// xsum, where not null, gets each block's sum of xq (int4_cpu.cpp's bias term).
constexpr int64_t kActBlock = 32;

__attribute__((target("avx2,fma"))) inline void quantize_activations(const float* x, int64_t M,
                                                                     int64_t K, bool nibble_order,
                                                                     int8_t* xq, float* xa,
                                                                     int32_t* xsum = nullptr) {
  static const int kNibbleOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / kActBlock; ++b) {
      const float* xb = x + m * K + b * kActBlock;
      __m256 v[kActBlock / 8];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < kActBlock / 8; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, amax);
      float top = 0.f;
      for (float f : lanes) top = top > f ? top : f;
      const float inv = top > 0.f ? 127.0f / top : 0.f;
      xa[m * (K / kActBlock) + b] = top / 127.0f;
      int8_t* out = xq + m * K + b * kActBlock;
      int32_t sum = 0;
      for (int i = 0; i < kActBlock / 8; ++i) {
        alignas(32) int32_t q[8];  // round to nearest even (the default MXCSR mode)
        _mm256_store_si256(reinterpret_cast<__m256i*>(q),
                           _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv))));
        for (int j = 0; j < 8; ++j) {
          out[8 * i + j] = static_cast<int8_t>(q[nibble_order ? kNibbleOrder[j] : j]);
          sum += q[j];
        }
      }
      if (xsum != nullptr) xsum[m * (K / kActBlock) + b] = sum;
    }
}

// y [M, Np] = x [M, K] @ W^T for int4 weights in the layout of int4_cpu.cpp; act8: with x
// quantized to int8 per block of 32 (where K and the group are multiples of 32, else x stays
// fp32).
void int4_gemm(const float* x, int64_t M, int64_t K, const int32_t* packed, const float* scale,
               const float* bias, int64_t Np, int64_t group_size, float* y, bool act8);

// y [M, N] = x [M, K] @ W^T for int8 weights w [N, Kp] (K padded with zeros to Kp, a multiple
// of 32) and x rounded to int8 per row (static_scale < 0) or by static_scale: w8a8_cpu.cpp.
void w8a8_gemm(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t Kp, int64_t N,
               const float* scale, float static_scale, float* y);

// Decode attention for B one-token sequences. q row b, head h at q + b * q_row + h * q_head;
// keys/values of kv head j, slot s at k + j * head_stride + s * slot_stride (same for v); out
// [B, H, D] contiguous.
void decode_attention(const float* q, int64_t q_row, int64_t q_head, const float* k,
                      const float* v, int64_t slot_stride, int64_t head_stride,
                      const int32_t* tables, int64_t max_blocks, const int32_t* lens, int64_t B,
                      int64_t H, int64_t Hkv, int64_t D, int64_t block_size, float scale,
                      float* out);

}  // namespace nibble
