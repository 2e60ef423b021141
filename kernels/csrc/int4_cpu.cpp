// int4 weights x 16/32-bit activations, or x activations rounded to int8, on x86 CPUs with
// AVX2 and FMA.
//
// Layout (built by kernels/native.py from the codes): output columns go in blocks of 8 and the
// inner dimension in chunks of 8. Word (b, c) of `packed` int32 [N/8, K/8, 8] holds, in lane j,
// the codes of column 8b + j at k = 8c .. 8c + 7, code i in bits 4i .. 4i + 3. One 32-byte
// load therefore gives 64 weights, and code i of all 8 columns is one shift and one mask.
//
// W[n, k] = q[n, k] * scale[g, n] + bias[g, n] for k in group g (bias = zero - 8 * scale for
// PyTorch's (q - 8) * scale + zero), accumulated in fp32 (see `tile`). Every row is computed
// by the same sequence of operations whatever the other rows are, so a row's output is
// bitwise independent of the batch. Rows go through in tiles of up to 4, which reuse each
// decoded weight vector; a single row takes 4 column blocks at a time instead.
//
// With act8 (the fused decode step's default, see tile_q8) the activations are rounded to
// int8 per block of 32 and multiplied in integers, about 2x the speed of the fp32 path.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "nibble_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRowTile = 4;   // rows per tile when M > 1: 8 accumulators, reused decodes
constexpr int kWideBlocks = 4;  // column blocks per tile when M == 1: 8 accumulators

// MR rows x NB column blocks. Per group, each row sums q * x[k] unscaled in two accumulators
// per block (even and odd k: a tile has at least 8 independent FMA chains whatever its
// shape), then adds (even + odd) * scale + bias * sum(x over the group) to its total. Every
// tile shape runs this same per-row arithmetic in the same order, so a row's result does not
// depend on the tile it went through.
template <int MR, int NB>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t K, const int32_t* w,
                                              const float* scale, const float* bias,
                                              int64_t Np, const float* xsum, int64_t G,
                                              int64_t gs, float* y) {
  __m256 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NB; ++n) acc[r][n] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF);
  const int64_t chunks = gs / 8;
  for (int64_t g = 0; g < G; ++g) {
    __m256 part[MR][NB][2];
    for (int r = 0; r < MR; ++r)
      for (int n = 0; n < NB; ++n) part[r][n][0] = part[r][n][1] = _mm256_setzero_ps();
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      __m256i v[NB];
      for (int n = 0; n < NB; ++n)
        v[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n * (K / 8) + c) * 8));
      const float* xc = x + c * 8;
#define NIBBLE_STEP(i)                                                                    \
  for (int n = 0; n < NB; ++n) {                                                          \
    const __m256 q =                                                                      \
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v[n], 4 * (i)), mask));      \
    for (int r = 0; r < MR; ++r)                                                          \
      part[r][n][(i) & 1] =                                                               \
          _mm256_fmadd_ps(q, _mm256_broadcast_ss(xc + r * K + (i)), part[r][n][(i) & 1]); \
  }
      NIBBLE_STEP(0) NIBBLE_STEP(1) NIBBLE_STEP(2) NIBBLE_STEP(3)
      NIBBLE_STEP(4) NIBBLE_STEP(5) NIBBLE_STEP(6) NIBBLE_STEP(7)
#undef NIBBLE_STEP
    }
    for (int n = 0; n < NB; ++n) {
      const __m256 s = _mm256_loadu_ps(scale + g * Np + n * 8);
      const __m256 b = _mm256_loadu_ps(bias + g * Np + n * 8);
      for (int r = 0; r < MR; ++r) {
        acc[r][n] = _mm256_fmadd_ps(_mm256_add_ps(part[r][n][0], part[r][n][1]), s, acc[r][n]);
        acc[r][n] = _mm256_fmadd_ps(b, _mm256_set1_ps(xsum[r * G + g]), acc[r][n]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NB; ++n) _mm256_storeu_ps(y + r * Np + n * 8, acc[r][n]);
}

using TileFn = void (*)(const float*, int64_t, const int32_t*, const float*, const float*,
                        int64_t, const float*, int64_t, int64_t, float*);
constexpr TileFn kRowTiles[kRowTile + 1] = {nullptr, tile<1, 1>, tile<2, 1>, tile<3, 1>,
                                            tile<4, 1>};

// The 8-bit activation path. Each row of x is quantized in blocks of kQBlock
// (nibble::quantize_activations), and within every chunk of 8 the bytes are stored as
// k = 0 2 4 6 1 3 5 7, so that the 4-byte word 2c of a row pairs with the low nibbles of a
// weight word (codes 0 2 4 6 of its column) and word 2c + 1 with the high nibbles. Two
// vpmaddubsw (unsigned codes x signed activations, pairs summed into int16) then give 8
// columns x 8 k products; a block's 8 such sums per lane stay below 8 * 2 * 15 * 127 = 30480,
// inside int16.
constexpr int64_t kQBlock = nibble::kActBlock;

// MR rows x NB column blocks on 8-bit activations. Per activation block, each row sums code x
// xq exactly in int16 lanes; per block the int32 sum goes to fp32 and into the row's total as
// sum * (scale * a); per group bias * sum(x over the group) follows, as in `tile`. The same
// per-row sequence in every tile shape keeps a row's result independent of the batch.
template <int MR, int NB>
__attribute__((target("avx2,fma"))) void tile_q8(const int8_t* xq, const float* xa, int64_t K,
                                                 const int32_t* w, const float* scale,
                                                 const float* bias, int64_t Np,
                                                 const float* xsum, int64_t G, int64_t gs,
                                                 float* y) {
  __m256 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NB; ++n) acc[r][n] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t KB = K / kQBlock, per_group = gs / kQBlock;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t blk = g * per_group; blk < (g + 1) * per_group; ++blk) {
      __m256i isum[MR][NB];
      for (int r = 0; r < MR; ++r)
        for (int n = 0; n < NB; ++n) isum[r][n] = _mm256_setzero_si256();
      for (int64_t c = blk * (kQBlock / 8); c < (blk + 1) * (kQBlock / 8); ++c) {
        for (int n = 0; n < NB; ++n) {
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n * (K / 8) + c) * 8));
          const __m256i lo = _mm256_and_si256(v, mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int r = 0; r < MR; ++r) {
            const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * K);
            const __m256i p = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xr[2 * c])),
                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xr[2 * c + 1])));
            isum[r][n] = _mm256_add_epi16(isum[r][n], p);
          }
        }
      }
      for (int n = 0; n < NB; ++n) {
        const __m256 s = _mm256_loadu_ps(scale + g * Np + n * 8);
        for (int r = 0; r < MR; ++r) {
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(isum[r][n], ones));
          acc[r][n] =
              _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_set1_ps(xa[r * KB + blk])), acc[r][n]);
        }
      }
    }
    for (int n = 0; n < NB; ++n) {
      const __m256 b = _mm256_loadu_ps(bias + g * Np + n * 8);
      for (int r = 0; r < MR; ++r)
        acc[r][n] = _mm256_fmadd_ps(b, _mm256_set1_ps(xsum[r * G + g]), acc[r][n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NB; ++n) _mm256_storeu_ps(y + r * Np + n * 8, acc[r][n]);
}

using TileQ8Fn = void (*)(const int8_t*, const float*, int64_t, const int32_t*, const float*,
                          const float*, int64_t, const float*, int64_t, int64_t, float*);
constexpr TileQ8Fn kRowTilesQ8[kRowTile + 1] = {nullptr, tile_q8<1, 1>, tile_q8<2, 1>,
                                                tile_q8<3, 1>, tile_q8<4, 1>};

void check(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& bias,
           int64_t group_size) {
  TORCH_CHECK(packed.dtype() == at::kInt && packed.dim() == 3 && packed.size(2) == 8 &&
                  packed.is_contiguous(),
              "packed must be contiguous int32 [N/8, K/8, 8]");
  const int64_t K = packed.size(1) * 8, Np = packed.size(0) * 8;
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && K % group_size == 0,
              "group_size must be a multiple of 8 dividing K");
  for (const auto* t : {&scale, &bias})
    TORCH_CHECK(t->dtype() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == K / group_size && t->size(1) == Np,
                "scale and bias must be contiguous float32 [K/group_size, N padded to 8]");
}

}  // namespace

void nibble::int4_gemm(const float* xp, int64_t M, int64_t K, const int32_t* wp,
                       const float* sp, const float* bp, int64_t Np, int64_t group_size,
                       float* yp, bool act8) {
  const int64_t G = K / group_size, KB = K / kQBlock;
  act8 = act8 && K % kQBlock == 0 && group_size % kQBlock == 0;  // else x stays fp32
  std::vector<int8_t> xq(act8 ? M * K : 0);
  std::vector<float> xa(act8 ? M * KB : 0);
  std::vector<int32_t> qsum(act8 ? M * KB : 0);  // per block: the sum of its int8 values
  if (act8) quantize_activations(xp, M, K, true, xq.data(), xa.data(), qsum.data());
  // bias * sum(x) per group; on the 8-bit path the sum of the quantized x, so that the row
  // computes exactly W . x_quantized (the codes' offset, which the bias cancels, then adds no
  // error of its own)
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      if (act8) {
        for (int64_t blk = g * (group_size / kQBlock); blk < (g + 1) * (group_size / kQBlock);
             ++blk)
          s += static_cast<float>(qsum[m * KB + blk]) * xa[m * KB + blk];
      } else {
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += xp[m * K + k];
      }
      xsum[m * G + g] = s;
    }
  const int64_t blocks = Np / 8;
  at::parallel_for(0, blocks, kWideBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end;) {
      const int64_t col = b * 8;
      if (M == 1 && b + kWideBlocks <= end) {
        if (act8)
          tile_q8<1, kWideBlocks>(xq.data(), xa.data(), K, wp + b * K, sp + col, bp + col, Np,
                                  xsum.data(), G, group_size, yp + col);
        else
          tile<1, kWideBlocks>(xp, K, wp + b * K, sp + col, bp + col, Np, xsum.data(), G,
                               group_size, yp + col);
        b += kWideBlocks;
        continue;
      }
      for (int64_t m = 0; m < M; m += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m));
        if (act8)
          kRowTilesQ8[rows](xq.data() + m * K, xa.data() + m * KB, K, wp + b * K, sp + col,
                            bp + col, Np, xsum.data() + m * G, G, group_size,
                            yp + m * Np + col);
        else
          kRowTiles[rows](xp + m * K, K, wp + b * K, sp + col, bp + col, Np,
                          xsum.data() + m * G, G, group_size, yp + m * Np + col);
      }
      ++b;
    }
  });
}

// x [M, K] (float32, bfloat16 or float16) -> [M, N] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& bias, int64_t group_size, int64_t N, bool act8) {
  check(packed, scale, bias, group_size);
  const int64_t K = packed.size(1) * 8, Np = packed.size(0) * 8;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  TORCH_CHECK(N > Np - 8 && N <= Np, "N does not match the packed columns");
  const int64_t M = x.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, Np}, x.options().dtype(at::kFloat));
  nibble::int4_gemm(xf.data_ptr<float>(), M, K, packed.data_ptr<int32_t>(),
                    scale.data_ptr<float>(), bias.data_ptr<float>(), Np, group_size,
                    y.data_ptr<float>(), act8);
  at::Tensor out = N == Np ? y : y.narrow(1, 0, N);
  return out.to(x.scalar_type()).contiguous();
}

// The dequantized weight transposed, W^T [K, Np] float32, written into `out` (the dense path
// for large batches: one GEMM that reuses every weight across rows).
void int4_dequantize_t(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& bias,
                       int64_t group_size, at::Tensor& out) {
  check(packed, scale, bias, group_size);
  const int64_t K = packed.size(1) * 8, Np = packed.size(0) * 8;
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.size(0) == K &&
                  out.size(1) == Np,
              "out must be contiguous float32 [K, N padded to 8]");
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float *sp = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, Np / 8, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t c = 0; c < K / 8; ++c) {
        const int64_t g = c * 8 / group_size;
        for (int64_t j = 0; j < 8; ++j) {
          const uint32_t word = static_cast<uint32_t>(wp[(b * (K / 8) + c) * 8 + j]);
          const float s = sp[g * Np + b * 8 + j], z = bp[g * Np + b * 8 + j];
          for (int64_t i = 0; i < 8; ++i)
            op[(c * 8 + i) * Np + b * 8 + j] = static_cast<float>((word >> (4 * i)) & 0xF) * s + z;
        }
      }
  });
}
