"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a flat batch.

Fused projections: q|k|v in one QuantLinear, gate|up in another. Qwen2 adds biases to q, k
and v; Qwen3 adds an RMSNorm over each head of q and k before the rotary embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelConfig, QuantPolicy
from engine.layers.attention import AttentionBatch, paged_attention
from engine.layers.embedding import Embedding
from engine.layers.linear import QuantLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from kernels import cpu


def residual_dtype_for(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU, as llama.cpp keeps its activations: rounding the residual stream to bf16
    after every layer flipped near-tie greedy tokens of int8 and int4-g32 variants that fp32
    activations keep (measured on the default model), at ~3 casts per layer."""
    return torch.float32 if device.type == "cpu" else act_dtype


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, policy: QuantPolicy, prefix: str, index: int):
        super().__init__()
        dt = policy.act_dtype
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = QuantLinear(cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size),
                                    policy.spec_for(f"{prefix}.qkv_proj"), dt, cfg.attention_bias)
        self.o_proj = QuantLinear(cfg.q_size, (cfg.hidden_size,), policy.spec_for(f"{prefix}.o_proj"), dt)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q + 2kv]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk = qkv[:, :self.q_size + self.kv_size].view(t, h + hkv, d)
        v = qkv[:, self.q_size + self.kv_size:].view(t, hkv, d)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])), 1)
        qk = apply_rotary(qk, cos, sin)  # q and k heads together: one set of ops per layer
        return self.o_proj(paged_attention(self.index, qk[:, :h], qk[:, h:], v, batch, self.scale))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, policy: QuantPolicy, prefix: str):
        super().__init__()
        dt, inter = policy.act_dtype, cfg.intermediate_size
        self.inter = inter
        self.gate_up_proj = QuantLinear(cfg.hidden_size, (inter, inter),
                                        policy.spec_for(f"{prefix}.gate_up_proj"), dt)
        self.down_proj = QuantLinear(inter, (cfg.hidden_size,), policy.spec_for(f"{prefix}.down_proj"), dt)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, policy: QuantPolicy, index: int, dt: torch.dtype):
        super().__init__()
        prefix = f"layers.{index}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.self_attn = Attention(cfg, policy, f"{prefix}.self_attn", index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.mlp = MLP(cfg, policy, f"{prefix}.mlp")

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """forward(input_ids [T], positions [T], batch) -> hidden [T, hidden]; logits() picks rows."""

    def __init__(self, cfg: ModelConfig, policy: QuantPolicy, max_positions: int,
                 residual_dtype: torch.dtype | None = None):
        super().__init__()
        self.config, self.policy = cfg, policy
        dt = policy.act_dtype
        # The residual stream and the norms may run wider than the linear layers' inputs
        # (fp32 on CPU, see residual_dtype_for); each QuantLinear casts its input.
        self.residual_dtype = rd = residual_dtype or dt
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dt)
        self.layers = nn.ModuleList(DecoderLayer(cfg, policy, i, rd) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rd)
        self.lm_head = QuantLinear(cfg.hidden_size, (cfg.vocab_size,), policy.spec_for("lm_head"), dt)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                      dict(cfg.rope_scaling) or None)
        # (weights, groups) of the fused C++ decode step, set by prepare where it applies, and
        # whether it quantizes the linear layers' inputs to int8
        self.native_decode: tuple[list[Tensor], list[int]] | None = None
        self.native_decode_act8 = True
        # an int8 lm_head's (codes, fp32 scales) for the logits of a fused decode step with
        # int8 activations (kernels/csrc/int8_cpu.cpp), and whether the last forward was one
        self.native_logits: tuple[Tensor, Tensor] | None = None
        self._fused_step = False

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, batch: AttentionBatch) -> Tensor:
        h = self.embed_tokens(input_ids).to(self.residual_dtype)
        d = batch.decode
        self._fused_step = self.native_decode is not None and d is not None \
            and d.kernel == "native" and len(d.seqs) == len(batch.query_lens)
        if self._fused_step:  # every row decodes one token
            return self.norm(self._native_layers(h, positions, batch))
        cos, sin = self.rotary.lookup(positions, self.residual_dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, batch)
        return self.norm(h)

    def _native_layers(self, h: Tensor, positions: Tensor, batch: AttentionBatch) -> Tensor:
        """Every layer of a pure decode step in one C++ call (kernels/csrc/llama_decode_cpu.cpp)."""
        from kernels import native

        cfg, d = self.config, batch.decode
        weights, groups = self.native_decode
        return native.load().llama_decode(
            h, self.rotary.cos[positions], self.rotary.sin[positions], weights, groups,
            batch.cache.k, batch.cache.v, batch.write_slots, d.tables, d.lens,
            batch.cache.block_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.rms_norm_eps, cfg.head_dim ** -0.5, self.native_decode_act8)

    def _native_decode_weights(self, device: torch.device, batch_invariant: bool):
        """(weights, groups) for kernels/csrc/llama_decode_cpu.cpp where every layer can take
        it, else None: a CPU with the native kernels, every linear layer on a layout the step
        takes (CpuLayout.fused_step: int4 on the native kernel, w8a8 with K a multiple of 32)
        without bias or input permutation, no q/k norms, fp32 residual, and no batch_invariant
        (the fused step keeps activations fp32 where the eager path rounds linear inputs and
        outputs to bf16, so a row's tokens could differ between a pure decode step and a step
        shared with a prompt chunk)."""
        if device.type != "cpu" or batch_invariant or self.residual_dtype != torch.float32 \
                or self.config.qk_norm:
            return None
        weights, groups = [], []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            for norm, linears in ((layer.input_layernorm, (a.qkv_proj, a.o_proj)),
                                  (layer.post_attention_layernorm, (m.gate_up_proj, m.down_proj))):
                weights.append(norm.weight.data.float().contiguous())
                for lin in linears:
                    p = getattr(lin.method, "_prepared", None)
                    step = p.fused_step() if isinstance(p, cpu.CpuLayout) else None
                    if step is None or lin.bias is not None or lin.input_perm is not None:
                        return None
                    weights += step[0]
                    groups.append(step[1])
        return weights, groups

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [R, hidden] -> fp32 logits [R, vocab]. After a fused decode step with int8
        activations, an int8 lm_head takes them too (native_logits)."""
        if self._fused_step and self.native_logits is not None:
            from kernels import native

            return native.load().int8_linear_act8(hidden.float(), *self.native_logits)
        return self.lm_head(hidden).float()

    def _native_logits_weights(self) -> tuple[Tensor, Tensor] | None:
        """The int8 lm_head's codes and fp32 scales where nibble's int8 kernel can take them."""
        method = self.lm_head.method
        p = getattr(method, "_prepared", None)
        if self.native_decode is None or not self.native_decode_act8 \
                or not isinstance(p, cpu.Int8Op) \
                or self.lm_head.bias is not None or p.qweight.shape[1] % 32:
            return None
        return p.qweight, p.scales_f32

    def quant_linears(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, QuantLinear)}

    def prepare(self, device: torch.device, batch_invariant: bool = False,
                decode_act8: bool = True) -> None:
        """Moves the model to ``device`` and repacks every quantized weight for its kernels;
        once, after loading. A tied 16-bit lm_head keeps sharing the embedding's storage.
        decode_act8: the fused CPU decode step quantizes linear inputs to int8 (EngineConfig's
        decode_activations)."""
        tied = self.lm_head_shares_embedding()
        self.to(device)  # parameters: embeddings and norms
        if tied:
            self.lm_head.method.stored = {"weight": self.embed_tokens.weight.data}
            self.lm_head.method.shared = True
        for m in self.quant_linears().values():
            m.prepare(device, batch_invariant)
        self.rotary.cos, self.rotary.sin = self.rotary.cos.to(device), self.rotary.sin.to(device)
        self.native_decode = self._native_decode_weights(device, batch_invariant)
        self.native_decode_act8 = decode_act8
        self.native_logits = self._native_logits_weights()

    def lm_head_shares_embedding(self) -> bool:
        stored = self.lm_head.method.stored.get("weight")
        return stored is not None and stored.data_ptr() == self.embed_tokens.weight.data_ptr()
