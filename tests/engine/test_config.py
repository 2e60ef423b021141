"""Quantization strings, rules and config files: parsed strictly, errors say what to write."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, QuantPolicy, QuantSpec, rules_from_config
from engine.config_files import is_config_name, presets, read_config
from engine.errors import ConfigError


@pytest.mark.parametrize("text,method,group,sym", [
    ("int4", "int4", 128, False), ("int4-g32", "int4", 32, False), ("INT4-G64", "int4", 64, False),
    ("int4-sym", "int4", 128, True), ("int4-sym-g64", "int4", 64, True), ("nf4", "nf4", 64, False),
    ("nf4-g128", "nf4", 128, False), ("int8", "int8", None, True), ("bf16", "bf16", None, False),
    ("int8-g32", "int8", 32, False),
])
def test_quant_strings(text, method, group, sym):
    spec = QuantSpec.parse(text)
    assert (spec.method, spec.group_size, spec.symmetric) == (method, group, sym)
    assert QuantSpec.parse(str(spec)) == spec
    assert spec.format == ("int8g" if text == "int8-g32" else method)


@pytest.mark.parametrize("text,hint", [
    ("int5", "Valid:"), ("in4", "Did you mean 'int4'"), ("int4-g100", "g32, g64, g128"),
    ("int8-sym", "unknown option"), ("int8-g48", "g32, g64, g128"), ("nf4-sym", "unknown option"), ("bf16-g64", "Valid:"),
])
def test_bad_quant_strings(text, hint):
    with pytest.raises(ConfigError, match=hint):
        QuantSpec.parse(text)


def test_policy_defaults_keep_lm_head_16bit_and_rules_override():
    p = QuantPolicy.build("int4", ["self_attn\\..*=int8", "lm_head=int8"])
    assert str(p.spec_for("layers.0.self_attn.qkv_proj")) == "int8"
    assert str(p.spec_for("layers.0.mlp.gate_up_proj")) == "int4"
    assert str(p.spec_for("lm_head")) == "int8"
    assert str(QuantPolicy.build("int4").spec_for("lm_head")) == "bf16"
    assert str(QuantPolicy.build("fp32").spec_for("lm_head")) == "fp32"


@pytest.mark.parametrize("rule,hint", [("mlp", "REGEX=FORMAT"), ("mlp(=int4", "bad regex"),
                                       ("mlp=int3", "unknown quantization")])
def test_bad_rules(rule, hint):
    with pytest.raises(ConfigError, match=hint):
        QuantPolicy.build("int4", [rule])


def test_config_file_keys_are_checked():
    with pytest.raises(ConfigError, match="Did you mean 'quant'"):
        EngineConfig.from_dict({"quants": "int4"})
    cfg = EngineConfig.from_dict({"quant": "int4", "rules": {"mlp\\..*": "int8"}})
    assert cfg.policy.spec_for("layers.1.mlp.down_proj").method == "int8"


@pytest.mark.parametrize("rules", ["mlp=int4", "", 5, False, [1]])
def test_file_rules_are_a_list_or_a_table(rules):
    """A bare string would otherwise be read as one rule per character."""
    with pytest.raises(ConfigError, match="list of 'REGEX=FORMAT' strings or a table"):
        rules_from_config(rules)
    with pytest.raises(ConfigError, match="list of 'REGEX=FORMAT' strings or a table"):
        EngineConfig.from_dict({"rules": rules})
    assert rules_from_config({"mlp": "int4"}) == ["mlp=int4"] == rules_from_config(["mlp=int4"])
    assert rules_from_config({}) == [] == rules_from_config([])


def test_config_files_and_presets(tmp_path):
    assert presets() == ["mixed-attn-int8-mlp-int4", "serve-ab-bf16-int4"]  # not models.toml
    assert presets("slo") == ["slo-cpu"]
    assert read_config("mixed-attn-int8-mlp-int4")["quant"] == "int4"
    assert read_config("mixed-attn-int8-mlp-int4.toml") == read_config("mixed-attn-int8-mlp-int4")
    assert is_config_name("mixed-attn-int8-mlp-int4") and is_config_name("mine.toml")
    assert not is_config_name("int4") and not is_config_name("slo-cpu")
    with pytest.raises(ConfigError, match="neither a file nor a preset; presets: mixed-attn"):
        read_config("no-such-preset")
    with pytest.raises(ConfigError, match="slo 'slo-gpu' is neither .* presets: slo-cpu$"):
        read_config("slo-gpu", kind="slo")
    mine = tmp_path / "mine.toml"
    mine.write_text('quant = "nf4"\n')
    assert read_config(str(mine)) == {"quant": "nf4"}
    mine.write_text("quant = \n")
    with pytest.raises(ConfigError, match="mine.toml: not valid TOML"):
        read_config(str(mine))


@pytest.mark.parametrize("values,hint", [
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ({"block_size": 8.5}, "block_size must be a positive integer"),
    ({"max_num_seqs": 32, "max_num_batched_tokens": 16}, "every decode fits a step"),
    ({"kv_cache_memory": -1}, "bytes .* or a fraction"),
    ({"kv_cache_memory": "2GB"}, "bytes .* or a fraction"),
    ({"max_num_seq": 8}, "Did you mean 'max_num_seqs'"),
    ({"decode_activations": "int4"}, "decode_activations must be 'int8' or 'fp32'"),
])
def test_batching_options_are_checked(values, hint):
    with pytest.raises(ConfigError, match=hint):
        EngineConfig.from_dict(values)


def test_kv_cache_budget_in_blocks():
    """Bytes, a fraction, or the default; never less than one full-length sequence."""
    from types import SimpleNamespace

    import torch

    from engine.config import ModelConfig, QuantPolicy
    from engine.model_runner import num_kv_blocks

    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=64, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    model = SimpleNamespace(config=cfg, policy=QuantPolicy.build("bf16"))
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # k and v, layers, block, kv heads, head dim, fp32 on CPU
    cpu = torch.device("cpu")
    assert num_kv_blocks(model, cpu, 256, 16, 4, 100 * per_block) == 100
    assert num_kv_blocks(model, cpu, 256, 16, 4, per_block) == 16  # one 256-token sequence
    assert num_kv_blocks(model, cpu, 256, 16, 4, None) == 4 * 16
    assert num_kv_blocks(model, cpu, 256, 16, 4, 1e-9) == 16
