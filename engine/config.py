"""Typed configuration: frozen dataclasses, checked when built.

Config never holds runtime state; an unknown key or a bad value is an error that says what
to write instead.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from engine.errors import ConfigError
from kernels import formats

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VALID_GROUPS = (32, 64, 128)
# `--quant gguf`: a GGUF file served on its own blocks (the policy comes from the file)
GGUF_NATIVE = "gguf"


def quant_examples() -> str:
    """Every spelling `--quant` takes, for errors and help: the float formats, each registered
    format's examples (kernels/formats.py), and gguf."""
    return ", ".join([*FLOAT_FORMATS, *formats.examples(), GGUF_NATIVE])


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class QuantSpec:
    """One module's storage format, parsed from strings like ``int4-g64`` or ``int4-sym``."""

    method: str  # fp32 | bf16 | fp16, or a format's family (kernels/formats.py): int8, int4, ...
    group_size: int | None = None  # int8: None is per output channel, a size is group-wise
    symmetric: bool = False

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        raw = text.strip().lower()
        base, *opts = raw.split("-")
        if base in FLOAT_FORMATS and not opts:
            return cls(base)
        fmt = formats.by_family(base)
        if fmt is None:
            examples = quant_examples()
            raise ConfigError(
                f"unknown quantization {text!r}.{_suggest(raw, examples.split(', '))}"
                f" Valid: {examples}."
            )
        group, symmetric = fmt.default_group, fmt.symmetric
        for opt in opts:
            if opt == "sym" and fmt.sym_option:
                symmetric = True
            elif re.fullmatch(r"g\d+", opt) and (fmt.grouped or fmt.group_format):
                group = int(opt[1:])
                if fmt.group_format:  # a group size selects another layout (int8 -> int8g)
                    symmetric = formats.get(fmt.group_format).symmetric
                if group not in VALID_GROUPS:
                    raise ConfigError(
                        f"group size {group} in {text!r} is not supported; use one of "
                        f"{', '.join(f'g{g}' for g in VALID_GROUPS)}."
                    )
            else:
                raise ConfigError(
                    f"unknown option {opt!r} in quantization {text!r}. Valid: {quant_examples()}."
                )
        return cls(base, group, symmetric)

    @property
    def is_float(self) -> bool:
        return self.method in FLOAT_FORMATS

    @property
    def format(self) -> str:
        """The storage format's registry name (kernels/formats.py): the method, or the layout a
        group size selects (group-wise int8 is "int8g")."""
        if self.is_float:
            return self.method
        fmt = formats.by_family(self.method)
        return fmt.group_format if fmt.group_format and self.group_size else fmt.name

    def __str__(self) -> str:
        if self.is_float or self.group_size is None:
            return self.method
        fmt = formats.by_family(self.method)
        text = self.method + ("-sym" if self.symmetric and fmt.sym_option else "")
        if self.group_size == fmt.default_group:
            return text
        return f"{text}-g{self.group_size}"


@dataclass(frozen=True)
class QuantPolicy:
    """Maps module names to storage formats.

    ``default`` applies to every linear layer except lm_head, which stays 16-bit like the
    embeddings and norms; ``rules`` are ``(regex, spec)`` pairs searched in order against the
    module name (``layers.3.mlp.gate_up_proj``), the first match wins and may name lm_head.
    """

    default: QuantSpec = QuantSpec("bf16")
    rules: tuple[tuple[str, QuantSpec], ...] = ()
    label: str = ""  # what describe() says instead of listing rules a file dictated

    @classmethod
    def build(cls, quant: str = "bf16", rules: list[str] | tuple[str, ...] = ()) -> QuantPolicy:
        """`quant` gguf: the file decides at load (engine/loader.py); until then bf16."""
        base = "bf16" if quant.strip().lower() == GGUF_NATIVE else quant
        return cls(QuantSpec.parse(base), tuple(parse_rule(r) for r in rules))

    def spec_for(self, module: str) -> QuantSpec:
        for pattern, spec in self.rules:
            if re.search(pattern, module):
                return spec
        if module == "lm_head":
            return QuantSpec(self.float_name)
        return self.default

    @property
    def float_name(self) -> str:
        """The 16/32-bit format of everything left unquantized (embeddings, norms, lm_head)."""
        return self.default.method if self.default.is_float else "bf16"

    @property
    def act_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.float_name]

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = [str(self.default)] + [f"{p}={s}" for p, s in self.rules]
        return ",".join(parts)


def parse_rule(text: str) -> tuple[str, QuantSpec]:
    """``'mlp\\..*=int4'`` -> (regex, spec); the regex must compile."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise ConfigError(
            f"quantization rule {text!r} must look like REGEX=FORMAT, e.g. 'mlp\\..*=int4' or "
            f"'self_attn\\..*=int8'."
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"quantization rule {text!r}: bad regex {pattern!r} ({exc}).") from None
    return pattern, QuantSpec.parse(spec)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family model (Llama 2/3, Mistral, Qwen2/3, SmolLM)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class EngineConfig:
    """What LLM(...) and the CLI build: which model, how it is stored, where it runs."""

    model: str = "smollm2-135m"
    quant: str | None = None  # None: bf16, or what a pre-quantized checkpoint holds
    rules: tuple[str, ...] = ()
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's context length, at most 8192
    seed: int = 0
    threads: int | None = None
    max_num_seqs: int = 16  # sequences in one batch at most
    max_num_batched_tokens: int = 512  # rows of one forward pass at most (prefill chunks)
    block_size: int = 16  # tokens per KV-cache block
    # KV cache size: bytes (> 1), or a fraction (0..1] of the machine's memory; None: enough
    # for max_num_seqs full-length sequences, at most 10% of the memory
    kv_cache_memory: float | None = None
    # True: every batch size takes the same kernel path, so a request's tokens do not depend on
    # what else is batched with it; False (default): the path is picked per batch size for speed
    batch_invariant: bool = False
    # The fused CPU decode step (int4 models on the native kernels): "int8" quantizes each
    # linear layer's input per block of 32 values and multiplies in integers (about 2x the
    # speed of "fp32", which keeps the activations exact; measured in the README)
    decode_activations: str = "int8"

    def __post_init__(self) -> None:
        self.policy  # noqa: B018 - parse now, so a typo fails at construction
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError(f"max_model_len must be at least 16, got {self.max_model_len}")
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                              f"least max_num_seqs ({self.max_num_seqs}) so every decode fits a step")
        mem = self.kv_cache_memory
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int | float)
                                or mem <= 0):
            raise ConfigError(f"kv_cache_memory must be bytes (e.g. 2e9) or a fraction of memory "
                              f"(e.g. 0.2), got {mem!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ConfigError(f"batch_invariant must be true or false, got {self.batch_invariant!r}")
        if self.decode_activations not in ("int8", "fp32"):
            raise ConfigError(f"decode_activations must be 'int8' or 'fp32', got "
                              f"{self.decode_activations!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def policy(self) -> QuantPolicy:
        return QuantPolicy.build(self.quant or "bf16", self.rules)

    @property
    def gguf_native(self) -> bool:
        """`quant="gguf"`: serve a GGUF file on its own blocks."""
        return (self.quant or "").strip().lower() == GGUF_NATIVE

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Builds from a config file's table; unknown keys are errors naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        for key in data:
            if key not in valid:
                raise ConfigError(
                    f"unknown config key {key!r}.{_suggest(key, valid)} Valid keys: {', '.join(valid)}."
                )
        values = dict(data)
        if "rules" in values:
            values["rules"] = tuple(rules_from_config(values["rules"]))
        return cls(**values)


def rules_from_config(rules: Any) -> list[str]:
    """Rules in a file are either a list of 'REGEX=FORMAT' or a table {REGEX = FORMAT}; anything
    else (a bare string, a number, false) is an error. The command line puts its --rule flags
    before these (the first match wins, so a flag overrides the file)."""
    if isinstance(rules, dict):
        return [f"{k}={v}" for k, v in rules.items()]
    if isinstance(rules, list) and all(isinstance(r, str) for r in rules):
        return rules
    raise ConfigError("'rules' must be a list of 'REGEX=FORMAT' strings or a table of REGEX = FORMAT")

