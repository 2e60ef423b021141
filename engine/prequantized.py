"""Hugging Face directories quantized by other tools, loaded as they are: GPTQ (AutoGPTQ /
GPTQModel layout, "gptq" and "gptq_v2" formats, 4 and 8 bit, act-order or not) and AWQ
(AutoAWQ GEMM layout, 4 bit), groups of 32, 64 or 128.

Each quantized module's codes, zero points and scales become our storage once, at load: int4
for 4-bit files, group-wise int8 for 8-bit ones; the codes unchanged, scale as stored,
zeros = (c - z) * scale for the format's middle code c, so nibble's formula gives the file's
values exactly in float32 (engine/quant/external.py). Nothing is dequantized and quantized
again. Act-order (desc_act) files have groups scattered along K: the columns are stored sorted
by group and the layer gathers its input in that order (QuantLinear.input_perm). Modules the
file keeps in 16 bits (lm_head, modules_to_not_convert) stay so.

Refused with a message: AWQ's GEMV layout or without zero points, 2- and 3-bit files, groups
other than 32/64/128, and other quant_methods.
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

PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


@dataclass(frozen=True)
class PrequantizedFormat:
    method: str  # gptq | awq
    group_size: int
    zero_offset: int  # GPTQ v1 stores z - 1
    bits: int = 4

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
                                  f"GPTQ and AWQ checkpoints (4-bit)")
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
                    if key.endswith(".qweight"):
                        modules.add(_module(key.removesuffix(".qweight"), path))
        if not modules:
            raise CheckpointError(f"{path} declares {self.method.upper()} but holds no qweight tensor")
        rules = tuple((f"^{re.escape(m)}$", self.spec) for m in sorted(modules))
        return QuantPolicy(QuantSpec(float_name), rules)

    def convert(self, parts: dict[str, Tensor], name: str) -> tuple[dict[str, Tensor], Tensor | None]:
        """One module's packed tensors -> (our stored tensors (qweight, scales, zeros), the
        input order of their columns for act-order GPTQ, else None)."""
        try:
            if self.method == "gptq":
                q, z, scales, g_idx = external.gptq_unpack(parts["qweight"], parts["qzeros"],
                                                           parts["scales"], parts["g_idx"],
                                                           self.bits, self.zero_offset)
                perm = None
                if external.is_act_order(g_idx, self.group_size):
                    perm = external.act_order_permutation(g_idx, self.group_size)
                    q, g_idx = q[:, perm], g_idx[perm]
                return external.to_stored(q, z, scales, self.group_size, g_idx=g_idx,
                                          bits=self.bits), perm
            q, z, scales = external.awq_unpack(parts["qweight"], parts["qzeros"], parts["scales"])
            return external.to_stored(q, z, scales, self.group_size), None
        except ValueError as exc:
            raise CheckpointError(f"{name}: {exc}") from None


def _module(prefix: str, path: Path) -> str:
    target = route(prefix + ".weight")
    if target is None:
        raise CheckpointError(f"{path}: quantized tensor {prefix} has no place in the model")
    return target[0]


def load_prequantized(model: LlamaModel, path: Path, fmt: PrequantizedFormat, tensors:
                      Iterator[tuple[str, Tensor]], total: int, progress: bool = True) -> None:
    """Streams the directory's tensors into the model: a quantized module's parts are gathered
    and converted when its last one arrives, the rest load as in any float checkpoint."""
    wanted = PARTS[fmt.method]
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
