// W8A8 on x86 CPUs with AVX2: int8 weights (per output channel) times activations rounded to
// int8 per row (one scale a token, or one calibrated scale for the tensor), summed exactly in
// int32, scaled once at the end. kernels/reference.py (quantize_activations, w8a8_linear) is
// the definition; this kernel computes it bit for bit.
//
// Rounding a row: s = max|x| / 127 (or the static scale), inv = 1 / max(s, FLT_MIN) (0 where
// s is 0),
// q = clamp(round_half_even(x * inv), -127, 127): the reference's operations in its order.
// The products: vpsignb moves the weight's sign onto the activation, vpmaddubsw multiplies
// |w| by it into int16 pairs (at most 2 * 127 * 127, no saturation), vpmaddwd sums pairs into
// int32 lanes, which accumulate over the whole row; y = float(acc) * s_x * s_w. Rows go in
// tiles of up to 4 sharing each loaded weight block, the same sequence for every row, so a
// row's result does not depend on the batch.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "nibble_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRows = 4;
constexpr int64_t kBlock = 32;

__attribute__((target("avx2,fma"))) inline int32_t hsum_epi32(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1))));
}

// One row of x [K] float32 -> xq [Kp] int8 (zeros past K) and its scale.
float quantize_row(const float* x, int64_t K, int64_t Kp, float static_scale, int8_t* xq) {
  float s = static_scale;
  if (s < 0.f) {  // dynamic: this row's absmax
    float top = 0.f;
    for (int64_t k = 0; k < K; ++k) top = std::max(top, std::fabs(x[k]));
    s = top / 127.0f;
  }
  const float inv = s > 0.f ? 1.0f / std::max(s, FLT_MIN) : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float q = std::nearbyint(x[k] * inv);  // the default mode: to nearest, ties to even
    xq[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
  }
  std::fill(xq + K, xq + Kp, int8_t{0});
  return s;
}

template <int MR>
__attribute__((target("avx2,fma"))) void dot_rows(const int8_t* xq, const float* sx, int64_t Kp,
                                                  const int8_t* w, float sw, float* y,
                                                  int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < Kp; k += kBlock) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i magnitude = _mm256_sign_epi8(v, v);
    for (int r = 0; r < MR; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * Kp + k));
      const __m256i p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, v));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
    }
  }
  for (int r = 0; r < MR; ++r)
    y[r * ldy] = static_cast<float>(hsum_epi32(acc[r])) * sx[r] * sw;
}

using DotFn = void (*)(const int8_t*, const float*, int64_t, const int8_t*, float, float*,
                       int64_t);
constexpr DotFn kDots[kRows + 1] = {nullptr, dot_rows<1>, dot_rows<2>, dot_rows<3>,
                                    dot_rows<4>};

}  // namespace

namespace nibble {

void w8a8_gemm(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t Kp, int64_t N,
               const float* scale, float static_scale, float* y) {
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      sx[m] = quantize_row(x + m * K, K, Kp, static_scale, xq.data() + m * Kp);
  });
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; m += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m));
        kDots[rows](xq.data() + m * Kp, sx.data() + m, Kp, w + n * Kp, scale[n], y + m * N + n,
                    N);
      }
  });
}

}  // namespace nibble

// x [M, K] float32; q [N, Kp] int8 (contiguous, Kp = K rounded up to 32, zeros past K);
// scale [N] float32; static_scale < 0: per-row scales -> y [M, N] float32.
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       double static_scale) {
  TORCH_CHECK(q.dtype() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "q must be contiguous int8 [N, Kp]");
  const int64_t N = q.size(0), Kp = q.size(1);
  TORCH_CHECK(Kp % kBlock == 0, "q's rows must be padded to a multiple of ", kBlock);
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale must be contiguous float32 [N]");
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) <= Kp &&
                  x.size(1) > Kp - kBlock,
              "x must be float32 [M, K] with K rounded up to 32 equal to ", Kp);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({xc.size(0), N}, x.options());
  nibble::w8a8_gemm(xc.data_ptr<float>(), xc.size(0), xc.size(1), q.data_ptr<int8_t>(), Kp, N,
                    scale.data_ptr<float>(), static_cast<float>(static_scale),
                    y.data_ptr<float>());
  return y;
}
