// int8 weights (per output channel, symmetric: PyTorch's [N, K] int8 codes and fp32 scales)
// x activations rounded to int8 per block of 32, on x86 CPUs with AVX2: the lm_head of a
// fused decode step when it is int8 (llama.cpp multiplies its Q8_0 output matrix the same way).
//
// Each output is a dot product along a weight row: vpsignb moves the weight's sign onto the
// activation, vpmaddubsw multiplies |w| (unsigned) by it and sums pairs into int16 (at most
// 2 * 127 * 127 = 32258: codes are clamped to [-127, 127]), vpmaddwd sums pairs into int32,
// and each block's int32 sums go to fp32 times the block's activation scale. Rows go through
// in tiles of up to 4 that share each loaded weight block; every row runs the same sequence
// whatever its tile, so its result does not depend on the batch.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "nibble_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRows = 4;

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int MR>
__attribute__((target("avx2,fma"))) void dot_rows(const int8_t* xq, const float* xa, int64_t K,
                                                  const int8_t* w, float s, float* y,
                                                  int64_t ldy) {
  const int64_t KB = K / nibble::kActBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
    const __m256i magnitude = _mm256_sign_epi8(v, v);
    for (int r = 0; r < MR; ++r) {
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * 32));
      const __m256i p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, v));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)),
                               _mm256_set1_ps(xa[r * KB + b]), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) y[r * ldy] = hsum(acc[r]) * s;
}

using DotFn = void (*)(const int8_t*, const float*, int64_t, const int8_t*, float, float*,
                       int64_t);
constexpr DotFn kDots[kRows + 1] = {nullptr, dot_rows<1>, dot_rows<2>, dot_rows<3>,
                                    dot_rows<4>};

}  // namespace

// x [M, K] float32, q [N, K] int8 (contiguous), scale [N] float32 -> y [M, N] float32.
at::Tensor int8_linear_act8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dtype() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "q must be contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(K % nibble::kActBlock == 0, "K must be a multiple of ", nibble::kActBlock);
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale must be contiguous float32 [N]");
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, ",
              K, "]");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), KB = K / nibble::kActBlock;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xa(M * KB);
  nibble::quantize_activations(xc.data_ptr<float>(), M, K, false, xq.data(), xa.data());
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; m += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m));
        kDots[rows](xq.data() + m * K, xa.data() + m * KB, K, wp + n * K, sp[n], yp + m * N + n,
                    N);
      }
  });
  return y;
}
