"""Hugging Face directories quantized by other tools, loaded as they are: GPTQ (AutoGPTQ /
GPTQModel layout, "gptq" and "gptq_v2" formats, 4 and 8 bit, act-order or not), AWQ
(AutoAWQ GEMM layout, 4 bit) and compressed-tensors "pack-quantized" (llm-compressor's
W4A16 / W8A16, group or channel scales, symmetric or not, act-order or not), groups of 32,
64 or 128.

Each quantized module's codes, zero points and scales become our storage once, at load: int4
for 4-bit files, group-wise int8 for 8-bit ones; the codes unchanged, scale as stored,
zeros = (c - z) * scale for the format's middle code c, so nibble's formula gives the file's
values exactly in float32 (engine/quant/external.py). Nothing is dequantized and quantized
again. Act-order (desc_act) files have groups scattered along K: the columns are stored sorted
by group and the layer gathers its input in that order (QuantLinear.input_perm). Modules the
file keeps in 16 bits (lm_head, modules_to_not_convert) stay so.

A compressed-tensors "channel" scheme (one scale per output row) becomes groups of 128 that
repeat the row's scale and zero point: the same values, in a layout our kernels serve.

Refused with a message: AWQ's GEMV layout or without zero points, 2- and 3-bit files, groups
other than 32/64/128, compressed-tensors formats other than pack-quantized, schemes that
quantize activations or differ between modules, and other quant_methods.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from engine.config import VALID_GROUPS, QuantPolicy, QuantSpec
from engine.errors import CheckpointError
from engine.loader import check_complete, load_weights, route
from engine.models.llama import LlamaModel
from engine.progress import progress_bar
from engine.quant import external

PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
         "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape")}
CT_GROUP_FOR_CHANNEL = 128  # a compressed-tensors channel scheme's scale, repeated per group


@dataclass(frozen=True)
class PrequantizedFormat:
    method: str  # gptq | awq | compressed-tensors
    group_size: int
    zero_offset: int  # GPTQ v1 stores z - 1
    bits: int = 4
    symmetric: bool = False  # compressed-tensors: no zero points stored
    channelwise: bool = False  # compressed-tensors "channel": one scale per output row
    act_order: bool = False  # compressed-tensors: weight_g_idx stored

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensor names (after the module's prefix) that make up one quantized module."""
        extra = ("weight_zero_point",) * (self.method == "compressed-tensors" and not self.symmetric)
        return PARTS[self.method] + extra + ("weight_g_idx",) * self.act_order

    @classmethod
    def read(cls, path: Path) -> PrequantizedFormat | None:
        """The quantization a Hugging Face directory declares (config.json's
        quantization_config, or AutoGPTQ's quantize_config.json); None for a float model."""
        data = json.loads((path / "config.json").read_text()).get("quantization_config")
        if data is None and (path / "quantize_config.json").is_file():
            data = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text())}
        if data is None:
            return None
        method = str(data.get("quant_method", "")).lower()
        if method not in PARTS:
            raise CheckpointError(f"{path}: quantization {method!r} is not supported; nibble loads "
                                  f"GPTQ, AWQ and compressed-tensors pack-quantized checkpoints")
        if method == "compressed-tensors":
            return cls._compressed_tensors(path, data)
        bits, group = data.get("bits", data.get("w_bit")), data.get("group_size", data.get("q_group_size"))
        if bits not in ((4, 8) if method == "gptq" else (4,)):
            raise CheckpointError(f"{path}: {bits}-bit {method.upper()} is not supported; nibble "
                                  f"loads {'4- and 8-bit' if method == 'gptq' else '4-bit'} "
                                  f"{method.upper()} checkpoints")
        if group not in VALID_GROUPS:
            raise CheckpointError(f"{path}: group size {group} is not supported; nibble's int4 "
                                  f"and int8-g take {', '.join(map(str, VALID_GROUPS))}")
        if method == "awq":
            version = str(data.get("version", "gemm")).lower()
            if version != "gemm" or data.get("zero_point") is False:
                raise CheckpointError(f"{path}: AWQ version {version!r} without the GEMM layout with "
                                      "zero points is not supported")
            return cls("awq", group, 0)
        return cls("gptq", group, 0 if data.get("checkpoint_format") == "gptq_v2" else 1, bits)

    @classmethod
    def _compressed_tensors(cls, path: Path, data: dict) -> PrequantizedFormat:
        fmt = data.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(f"{path}: compressed-tensors format {fmt!r} is not supported; "
                                  "nibble loads pack-quantized (W4A16, W8A16) checkpoints (for "
                                  "W8A8, quantize the 16-bit model with `nibble quantize "
                                  "--method smoothquant`)")
        groups = list((data.get("config_groups") or {}).values())
        if not groups:
            raise CheckpointError(f"{path}: compressed-tensors config has no config_groups")
        if any(g.get("input_activations") or g.get("output_activations") for g in groups):
            raise CheckpointError(f"{path}: compressed-tensors schemes that quantize activations "
                                  "are not supported; nibble loads weight-only W4A16/W8A16 (for "
                                  "W8A8, quantize the 16-bit model with `nibble quantize "
                                  "--method smoothquant`)")
        schemes = {json.dumps(g.get("weights"), sort_keys=True) for g in groups}
        if len(schemes) != 1:
            raise CheckpointError(f"{path}: compressed-tensors config groups with different "
                                  "weight schemes are not supported; nibble loads one scheme")
        w = groups[0].get("weights") or {}
        bits, strategy = w.get("num_bits"), w.get("strategy")
        if w.get("type", "int") != "int" or bits not in (4, 8):
            raise CheckpointError(f"{path}: compressed-tensors {w.get('type')} weights of {bits} "
                                  "bits are not supported; nibble loads int 4- and 8-bit")
        if strategy not in ("group", "channel"):
            raise CheckpointError(f"{path}: compressed-tensors strategy {strategy!r} is not "
                                  "supported; nibble loads group and channel scales")
        group = CT_GROUP_FOR_CHANNEL if strategy == "channel" else w.get("group_size")
        if group not in VALID_GROUPS:
            raise CheckpointError(f"{path}: group size {group} is not supported; nibble's int4 "
                                  f"and int8-g take {', '.join(map(str, VALID_GROUPS))}")
        return cls("compressed-tensors", group, 0, bits, symmetric=bool(w.get("symmetric", True)),
                   channelwise=strategy == "channel", act_order=w.get("actorder") == "group")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("int4" if self.bits == 4 else "int8", self.group_size)

    def policy(self, path: Path, float_name: str) -> QuantPolicy:
        """int4 for exactly the modules the files hold packed; the rest stays float_name."""
        from safetensors import safe_open

        modules = set()
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key.endswith(f".{self.parts[0]}"):
                        modules.add(_module(key.removesuffix(f".{self.parts[0]}"), path))
        if not modules:
            raise CheckpointError(f"{path} declares {self.method.upper()} but holds no "
                                  f"{self.parts[0]} tensor")
        rules = tuple((f"^{re.escape(m)}$", self.spec) for m in sorted(modules))
        return QuantPolicy(QuantSpec(float_name), rules)

    def convert(self, parts: dict[str, Tensor], name: str) -> tuple[dict[str, Tensor], Tensor | None]:
        """One module's packed tensors -> (our stored tensors (qweight, scales, zeros), the
        input order of their columns for act-order files, else None)."""
        try:
            q, z, scales, g_idx = self._unpack(parts)
            perm = None
            if g_idx is not None and external.is_act_order(g_idx, self.group_size):
                perm = external.act_order_permutation(g_idx, self.group_size)
                q = q[:, perm]  # groups contiguous along K, as our layouts want
            return external.to_stored(q, z, scales, self.group_size, bits=self.bits), perm
        except ValueError as exc:
            raise CheckpointError(f"{name}: {exc}") from None

    def _unpack(self, parts: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """-> (q [N, K], z [G, N], scales [G, N], g_idx [K] or None) in the file's column order."""
        if self.method == "gptq":
            return external.gptq_unpack(parts["qweight"], parts["qzeros"], parts["scales"],
                                        parts["g_idx"], self.bits, self.zero_offset)
        if self.method == "awq":
            return (*external.awq_unpack(parts["qweight"], parts["qzeros"], parts["scales"]), None)
        q, z, scales = external.ct_unpack(parts["weight_packed"], parts["weight_shape"].tolist(),
                                          parts["weight_scale"], parts.get("weight_zero_point"),
                                          self.bits)
        if self.channelwise:  # the row's scale and zero point for every group
            G = -(-q.shape[1] // self.group_size)
            z, scales = z.expand(G, -1).contiguous(), scales.expand(G, -1).contiguous()
        return q, z, scales, parts.get("weight_g_idx")


def _module(prefix: str, path: Path) -> str:
    target = route(prefix + ".weight")
    if target is None:
        raise CheckpointError(f"{path}: quantized tensor {prefix} has no place in the model")
    return target[0]


def load_prequantized(model: LlamaModel, path: Path, fmt: PrequantizedFormat, tensors:
                      Iterator[tuple[str, Tensor]], total: int, progress: bool = True) -> None:
    """Streams the directory's tensors into the model: a quantized module's parts are gathered
    and converted when its last one arrives, the rest load as in any float checkpoint."""
    wanted = fmt.parts
    modules = dict(model.named_modules())
    pending: dict[str, dict[str, Tensor]] = {}

    def floats() -> Iterator[tuple[str, Tensor]]:
        for name, t in progress_bar(tensors, total=total, desc="loading", unit="tensor",
                                    enabled=progress):
            prefix, _, part = name.rpartition(".")
            if part not in wanted:
                yield name, t
                continue
            parts = pending.setdefault(prefix, {})
            parts[part] = t
            if len(parts) == len(wanted):
                module, _, shard = route(prefix + ".weight")
                modules[module].load_stored_shard(shard, *fmt.convert(pending.pop(prefix), prefix))

    load_weights(model, floats(), total, progress=False, check=False)
    if pending:
        missing = {p: sorted(set(wanted) - set(parts)) for p, parts in pending.items()}
        raise CheckpointError(f"{path}: quantized modules with missing parts: {missing}")
    check_complete(model)
