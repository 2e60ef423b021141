"""`nibble quantize --method smoothquant`: SmoothQuant (Xiao et al., 2023) for the w8a8 format.

int8 activations lose most to a few input features whose values are far larger than the rest
(per-token rounding spends its 255 levels on them). SmoothQuant moves that range into the
weights, which are rounded per output channel and take it better: for input feature j of a
linear layer

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),   X' = X / s,   W' = W diag(s)

(max|X_j| over the calibration tokens, max|W_j| over the output rows), so X' W'^T = X W^T.
The division by s is folded into whatever produces X, and the float model computes the same
function before rounding. In a Llama decoder layer:

    qkv_proj      input_layernorm's weight / s; one s for q, k and v (max|W_j| over all rows)
    gate_up_proj  post_attention_layernorm's weight / s
    down_proj     the rows of up (the second half of gate_up_proj) / s: its input is
                  silu(gate) * up, linear in up
    o_proj        not smoothed, as in SmoothQuant's reference: its input is attention's
                  output, and with grouped-query attention one row of v feeds several query
                  heads, which would each need their own s (awq_model folds into v's rows only
                  where every query head has its own value head); still stored as w8a8

down_proj is smoothed before gate_up_proj, so gate_up's s sees up's rows as they will be
rounded. A feature that never fired in calibration (max|X_j| = 0), or whose weight column is
zero, keeps s = 1; s is clamped to [1e-5, 1e5].

Static activation scales ("static"): a second pass over the smoothed float model records the
largest |x| of each linear layer's whole input; input_scale = that / 127. "dynamic" rounds
each token's row by its own absmax at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from engine.calibrate import collect_absmax, fold_scales
from engine.checkpoint import QUANT_FILE, save_checkpoint
from engine.config import QuantPolicy, QuantSpec
from engine.errors import ConfigError
from engine.loader import set_param
from engine.models.llama import LlamaModel, residual_dtype_for
from engine.progress import progress_bar

FORMAT = "w8a8"
ALPHA = 0.5
ACT_SCALES = ("dynamic", "static")
SCALE_RANGE = (1e-5, 1e5)
# the smoothed linear layers of a decoder layer, down first (see the module docstring)
SMOOTHED = ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.qkv_proj")
INT8_MAX = 127.0


def smooth_scales(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """act_absmax [K] (max |x_j| over calibration tokens), weight [N, K] -> s [K] float32."""
    a = act_absmax.float()
    w = weight.float().abs().amax(0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(*SCALE_RANGE)


def smooth_model(model: LlamaModel, act_absmax: dict[str, Tensor], alpha: float = ALPHA,
                 progress: bool = True) -> dict[str, Tensor]:
    """Folds SmoothQuant's scales into a float model in place (its linear layers must still
    hold their float weights: fp32, or 16-bit without a packed-only GEMM copy). act_absmax:
    collect_absmax's per-feature maxima. -> s [K] per smoothed linear layer."""
    check_alpha(alpha)
    scales: dict[str, Tensor] = {}
    for i in progress_bar(range(model.config.num_layers), desc="smoothing", unit="layer",
                          enabled=progress):
        linears = {k: model.get_submodule(f"layers.{i}.{k}") for k in SMOOTHED}
        w = {k: lin.method.dequantize().clone() for k, lin in linears.items()}
        for k in SMOOTHED:  # in order: gate_up's s sees up's rows divided by down's
            s = scales[f"layers.{i}.{k}"] = smooth_scales(
                act_absmax[f"layers.{i}.{k}"], w[k], alpha).to(w[k].device)
            fold_scales(model, i, w, k, s)
        for k, lin in linears.items():
            # load and prepare again: a prepared copy (a packed 16-bit GEMM weight) must follow
            lin.method.load(lin.method.quantize(w[k]))
            lin.method.prepare(w[k].device)
    return scales


def w8a8_model(model: LlamaModel, input_absmax: dict[str, Tensor] | None = None,
               progress: bool = True) -> LlamaModel:
    """A new model on the CPU, unprepared (as save_checkpoint takes it): every linear layer of
    `model` but lm_head in w8a8, with input_scale = input_absmax / 127 where given (static
    activation scales); embeddings, norms and lm_head in 16-bit, as `--quant w8a8` keeps them."""
    policy = QuantPolicy(QuantSpec.parse(FORMAT))
    cpu = torch.device("cpu")
    out = LlamaModel(model.config, policy, model.rotary.cos.shape[0],
                     residual_dtype_for(policy.act_dtype, cpu))
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        set_param(out.get_submodule(module), kind, param.data.to(cpu, copy=True), name)
    linears = {n: m for n, m in out.quant_linears().items() if n != "lm_head"}
    for name in progress_bar(list(linears), desc="quantizing", unit="layer", enabled=progress):
        src, lin = model.get_submodule(name), linears[name]
        stored = lin.method.quantize(src.method.dequantize().to(cpu))
        if input_absmax is not None:
            stored["input_scale"] = (input_absmax[name].float().reshape(1) / INT8_MAX).to(cpu)
        lin.load_quantized(stored, None if src.bias is None else src.bias.to(cpu))
    head = (out.embed_tokens.weight.data if model.config.tie_word_embeddings
            else model.lm_head.method.dequantize().to(cpu))
    out.lm_head.load_shard("weight", 0, head)
    return out


def smoothquant(llm, chunks: list[list[int]], alpha: float = ALPHA, act_scales: str = "dynamic",
                progress: bool = True) -> LlamaModel:
    """Calibrates `llm` (a float LLM) on `chunks`, smooths its model in place and returns the
    w8a8 model (w8a8_model)."""
    if act_scales not in ACT_SCALES:
        raise ConfigError(f"act_scales {act_scales!r}: choose {' or '.join(ACT_SCALES)}")
    smooth_model(llm.model, collect_absmax(llm, chunks, progress=progress), alpha, progress)
    static = (collect_absmax(llm, chunks, per_feature=False, progress=progress)
              if act_scales == "static" else None)
    return w8a8_model(llm.model, static, progress)


def save(model: LlamaModel, tokenizer, out: Path, source: str, record: dict) -> Path:
    """save_checkpoint, with how it was calibrated (`record`: alpha, act_scales, calibration
    text and tokens) under "smoothquant" in nibble_quant.json."""
    save_checkpoint(model, tokenizer, out, source)
    path = out / QUANT_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | {"smoothquant": record}, indent=2))
    return out


def check_flags(method: str, alpha: float | None, act_scales: str | None,
                other_flags: list[str]) -> None:
    """`nibble quantize`'s SmoothQuant flags: --alpha and --act-scales only with --method
    smoothquant, alpha in [0, 1], and none of `other_flags` (flags given that another method
    reads, such as --bits) with it."""
    if method != "smoothquant":
        given = [f for f, v in (("--alpha", alpha), ("--act-scales", act_scales)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} is a SmoothQuant option; drop it or use --method "
                              "smoothquant")
        return
    if other_flags:
        raise ConfigError(f"{other_flags[0]} does not apply to --method smoothquant, which "
                          f"stores every linear layer but lm_head as {FORMAT} (int8 per output "
                          "channel); drop it")
    if alpha is not None:
        check_alpha(alpha, "--alpha")


def check_alpha(alpha: float, name: str = "alpha") -> None:
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise ConfigError(f"{name} {alpha}: SmoothQuant's migration strength lies between 0 and "
                          "1 (the share of the activations' range moved into the weights); 0.5 "
                          "suits most models, 0.75-0.85 those with large activation outliers")
