// Every decoder layer of a Llama decode step in one call, for models whose linear layers are
// all int4 or w8a8 on the native kernels: the eager path's ~25 PyTorch ops per layer (each
// with its Python and dispatcher overhead) become plain loops and the same GEMM and attention
// cores. Activations stay float32 between operations (the eager path rounds each linear
// layer's input and output to bf16), and with act8 each int4 GEMM rounds its input to int8
// per block of 32 (int4_cpu.cpp; a w8a8 GEMM always rounds it per row, w8a8_cpu.cpp), so
// results agree with the eager path to rounding, not bitwise; the engine uses this only
// where batch invariance is not asked for.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "nibble_cpu.h"

namespace {

constexpr int kPerLayer = 14;  // tensors per layer in `weights`, see llama_decode

void rms_norm(const float* x, const float* w, int64_t T, int64_t n, float eps, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += xt[i] * xt[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) y[t * n + i] = xt[i] * r * w[i];
  }
}

// rotate-half rotary on `heads` heads of D starting at x (row stride ld), row t's angle table
// cos/sin [T, D/2]
void rotary(float* x, int64_t ld, int64_t T, int64_t heads, int64_t D, const float* cos,
            const float* sin) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + t * ld + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half], c = cos[t * half + i], s = sin[t * half + i];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
}

// out[t, i] = silu(gu[t, i]) * gu[t, inter + i]
__attribute__((target("avx2,fma"))) void silu_mul(const float* gu, int64_t ld, int64_t T,
                                                  int64_t inter, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gu + t * ld;
    const float* u = g + inter;
    float* o = out + t * inter;
    int64_t i = 0;
    for (; i + 8 <= inter; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      // sigmoid from e = exp(-|x|) <= 1: 1 / (1 + e) for x >= 0, e / (1 + e) below
      const __m256 e = nibble::exp_nonpositive(_mm256_or_ps(x, sign));
      const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
      const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

// One linear layer: int4 (words int32 [Np/8, K/8, 8], scale and bias [K/group, Np]) or w8a8
// (codes int8 [Np, Kp], scale [Np], static input scale: one value, or none for per-row).
struct Linear {
  const int32_t* w4 = nullptr;
  const int8_t* w8 = nullptr;
  const float *scale, *bias = nullptr;
  int64_t K, Np, group = 0, Kp = 0;
  float static_scale = -1.f;
};

Linear linear(const std::vector<at::Tensor>& ws, int64_t i, int64_t group) {
  const at::Tensor& w = ws[i];
  TORCH_CHECK(w.is_contiguous() && ws[i + 1].is_contiguous() && ws[i + 2].is_contiguous(),
              "contiguous weights");
  Linear l;
  l.scale = ws[i + 1].data_ptr<float>();
  if (w.dtype() == at::kChar) {  // w8a8; K is the padded width (the inputs fill it)
    TORCH_CHECK(w.dim() == 2 && w.size(1) % 32 == 0 && ws[i + 1].numel() == w.size(0),
                "w8a8 codes int8 [N, Kp] and scales [N]");
    l.w8 = w.data_ptr<int8_t>();
    l.K = l.Kp = w.size(1);
    l.Np = w.size(0);
    if (ws[i + 2].numel()) l.static_scale = ws[i + 2].data_ptr<float>()[0];
    return l;
  }
  TORCH_CHECK(w.dtype() == at::kInt && w.dim() == 3, "int4 weights in the native layout");
  l.w4 = w.data_ptr<int32_t>();
  l.bias = ws[i + 2].data_ptr<float>();
  l.K = w.size(1) * 8;
  l.Np = w.size(0) * 8;
  l.group = group;
  return l;
}

void apply(const Linear& l, const float* x, int64_t T, float* y, bool act8) {
  if (l.w8)
    nibble::w8a8_gemm(x, T, l.K, l.w8, l.Kp, l.Np, l.scale, l.static_scale, y);
  else
    nibble::int4_gemm(x, T, l.K, l.w4, l.scale, l.bias, l.Np, l.group, y, act8);
}

}  // namespace

// h [T, hidden] float32: the embedded tokens of T one-token sequences -> the hidden states
// after the last layer (before the final norm). cos/sin [T, head_dim/2] at each row's
// position. weights: per layer, in order, input norm [hidden]; qkv, o (three tensors each, see
// Linear); post-attention norm; gate|up, down (three each). groups: per layer the four
// kernel group sizes (0 for w8a8). k_caches/v_caches: per layer [Hkv, slots, D]
// float32. slots int64 [T]: where each row's key and value go; block_tables/context_lens as
// in paged_decode_attention (the contexts include the new token).
at::Tensor llama_decode(const at::Tensor& h_in, const at::Tensor& cos, const at::Tensor& sin,
                        const std::vector<at::Tensor>& weights, const std::vector<int64_t>& groups,
                        const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, const at::Tensor& slots,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, double eps, double scale, bool act8) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kPerLayer &&
                  static_cast<int64_t>(groups.size()) == L * 4 &&
                  static_cast<int64_t>(v_caches.size()) == L,
              "weights, groups and caches must cover every layer");
  TORCH_CHECK(h_in.dtype() == at::kFloat && h_in.dim() == 2, "h must be float32 [T, hidden]");
  TORCH_CHECK(cos.dtype() == at::kFloat && sin.dtype() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos/sin: contiguous float32 [T, head_dim/2]");
  TORCH_CHECK(slots.dtype() == at::kLong && block_tables.dtype() == at::kInt &&
                  context_lens.dtype() == at::kInt && block_tables.is_contiguous(),
              "int64 slots, int32 block tables and lengths");
  TORCH_CHECK(head_dim % 8 == 0 && num_heads % num_kv_heads == 0, "head_dim % 8, GQA groups");
  at::Tensor h = h_in.contiguous().clone();
  const int64_t T = h.size(0), hidden = h.size(1), D = head_dim;
  const int64_t qd = num_heads * D, kvd = num_kv_heads * D;
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  float* hp = h.data_ptr<float>();
  std::vector<float> x, qkv, attn(T * qd), tmp, act;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t base = l * kPerLayer;
    const Linear lq = linear(weights, base + 1, groups[l * 4]);
    const Linear lo = linear(weights, base + 4, groups[l * 4 + 1]);
    const Linear lg = linear(weights, base + 8, groups[l * 4 + 2]);
    const Linear ld = linear(weights, base + 11, groups[l * 4 + 3]);
    TORCH_CHECK(lq.K == hidden && lq.Np >= qd + 2 * kvd && lo.K == qd && lo.Np >= hidden &&
                    lg.K == hidden && 2 * ld.K <= lg.Np && ld.Np >= hidden,
                "layer ", l, ": weight shapes do not match the config");
    TORCH_CHECK(k_caches[l].dtype() == at::kFloat && k_caches[l].is_contiguous() &&
                    v_caches[l].is_contiguous() && k_caches[l].strides() == v_caches[l].strides(),
                "layer ", l, ": contiguous float32 KV caches [Hkv, slots, D]");
    const int64_t inter = ld.K;
    x.resize(T * hidden);
    rms_norm(hp, weights[base].data_ptr<float>(), T, hidden, static_cast<float>(eps), x.data());
    qkv.resize(T * lq.Np);
    apply(lq, x.data(), T, qkv.data(), act8);
    rotary(qkv.data(), lq.Np, T, num_heads + num_kv_heads, D, cp, sp);  // q and k heads
    const at::Tensor& kc = k_caches[l];
    const at::Tensor& vc = v_caches[l];
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    const int64_t head_stride = kc.stride(0), slot_stride = kc.stride(1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < num_kv_heads; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t at = j * head_stride + slot[t] * slot_stride + d;
          kp[at] = qkv[t * lq.Np + qd + j * D + d];
          vp[at] = qkv[t * lq.Np + qd + kvd + j * D + d];
        }
    nibble::decode_attention(qkv.data(), lq.Np, D, kp, vp, slot_stride, head_stride,
                             block_tables.data_ptr<int32_t>(), block_tables.size(1),
                             context_lens.data_ptr<int32_t>(), T, num_heads, num_kv_heads, D,
                             block_size, static_cast<float>(scale), attn.data());
    tmp.resize(T * std::max(lo.Np, ld.Np));
    apply(lo, attn.data(), T, tmp.data(), act8);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < hidden; ++i) hp[t * hidden + i] += tmp[t * lo.Np + i];
    rms_norm(hp, weights[base + 7].data_ptr<float>(), T, hidden, static_cast<float>(eps),
             x.data());
    act.resize(T * std::max(lg.Np, inter));
    std::vector<float>& gu = qkv;  // reused: gate|up rows
    gu.resize(T * lg.Np);
    apply(lg, x.data(), T, gu.data(), act8);
    silu_mul(gu.data(), lg.Np, T, inter, act.data());
    apply(ld, act.data(), T, tmp.data(), act8);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < hidden; ++i) hp[t * hidden + i] += tmp[t * ld.Np + i];
  }
  return h;
}
