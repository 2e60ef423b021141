"""The `nibble` command as a user runs it, on the real default model: real subprocesses, and
in-process `main()` where a subprocess would only add start-up time."""

from __future__ import annotations

import io
import json

import pytest

from tests.server.cli_helpers import assert_clean_error, nibble


def test_help_lists_commands():
    out = nibble("--help").stdout
    for cmd in ("generate", "chat", "quantize", "inspect", "serve", "compare"):
        assert cmd in out
    assert "int4-g32" in nibble("generate", "--help").stdout


@pytest.mark.parametrize("args,fragments", [
    (["generate", "-m", "smolm2-135m", "hi"], ["smollm2-135m"]),
    (["generate", "-q", "int5", "hi"], ["unknown quantization 'int5'"]),
    (["generate", "-q", "in4", "hi"], ["Did you mean 'int4'"]),
    (["generate", "-r", "mlp=int3", "hi"], ["unknown quantization"]),
    (["generate", "-r", "mlp(=int4", "hi"], ["bad regex"]),
    (["generate", "-r", "mlp", "hi"], ["REGEX=FORMAT"]),
    (["generate", "-c", "no-such-preset", "hi"], ["presets:"]),
    (["generate", "--temperature", "-1", "hi"], ["temperature"]),
])
def test_user_mistakes_give_one_clear_error(args, fragments):
    assert_clean_error(nibble(*args), *fragments)


def test_rule_flags_go_before_the_config_file_rules(tmp_path):
    """--rule flags come first, so they win over the file's rules; the file's rules are checked
    the same way with or without flags."""
    from engine.errors import ConfigError
    from server.cli import build_parser, engine_config

    def cfg(*argv):
        return engine_config(build_parser().parse_args(["generate", *argv, "hi"]))

    preset = cfg("-c", "mixed-attn-int8-mlp-int4", "-r", "mlp\\.down_proj=nf4")
    assert preset.rules == ("mlp\\.down_proj=nf4", "self_attn\\..*=int8", "mlp\\..*=int4")
    assert preset.policy.spec_for("layers.0.mlp.down_proj").method == "nf4"
    assert preset.policy.spec_for("layers.0.mlp.up_proj").method == "int4"
    assert cfg("-r", "mlp=int8").rules == ("mlp=int8",)
    bad = tmp_path / "bad.toml"
    bad.write_text('rules = "mlp=int4"\n')  # a string, not a list: once read as 8 rules of 1 char
    for flags in ([], ["-r", "self_attn=int8"]):
        with pytest.raises(ConfigError, match="list of 'REGEX=FORMAT' strings or a table"):
            cfg("-c", str(bad), *flags)


def test_corrupt_and_truncated_gguf(tmp_path, default_source):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert_clean_error(nibble("generate", "-m", str(bad), "hi"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_source.path.read_bytes()[:1_000_000])
    assert_clean_error(nibble("generate", "-m", str(cut), "hi"), "cut.gguf")


@pytest.mark.slow
def test_generate_json_answers(default_source):
    proc = nibble("generate", "-q", "int4", "--chat", "--json", "--max-tokens", "20",
                  "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "Paris" in result["text"]
    assert result["completion_tokens"] == len(result["token_ids"]) <= 20


@pytest.mark.slow
def test_chat_reads_turns_from_stdin(default_source, monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/reset\n/exit\n"))
    assert main(["chat", "-q", "int8", "--temperature", "0", "--max-tokens", "20"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_reports_formats_and_bytes(default_source, capsys):
    from server.cli import main

    assert main(["inspect", "-q", "int4", "-r", "self_attn\\..*=int8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    formats = {m["name"]: m["format"] for m in data["modules"]}
    assert formats["layers.0.self_attn.qkv_proj"] == "int8"
    assert formats["layers.0.mlp.down_proj"] == "int4"
    assert formats["lm_head"] == "bf16" and formats["embed_tokens"] == "bf16"
    sizes = data["bytes_per_format"]
    # int4-g128: 0.5 byte per weight plus fp32 scale and zero per group of 128.
    gate_up = 576 * 3072
    assert sizes["int4"] == 30 * (gate_up // 2 + 3072 * 5 * 8 + 1536 * 576 // 2 + 576 * 12 * 8)
    assert sizes["int8"] == 30 * (960 * 576 + 960 * 4 + 576 * 576 + 576 * 4)  # + fp32 scales
    # bf16: the embedding alone, which the tied lm_head shares (0 bytes of its own)
    assert sizes["bf16"] == 49152 * 576 * 2
    assert formats["norm"] == "fp32"  # norms follow the CPU's fp32 residual stream


@pytest.mark.slow
def test_quantize_then_generate_from_checkpoint(tmp_path, default_source):
    out = tmp_path / "ckpt"
    proc = nibble("quantize", "-q", "int4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "nibble_quant.json").exists() and (out / "model.safetensors").exists()
    proc = nibble("generate", "-m", str(out), "--chat", "--max-tokens", "20", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert_clean_error(nibble("quantize", "-q", "int8", "--out", str(out)), "not empty")
