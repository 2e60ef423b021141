"""nibble quantize -> load gives bit-identical packed weights, without quantizing again."""

from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, SamplingParams, build
from engine.checkpoint import save_checkpoint
from engine.config import EngineConfig
from engine.quant.base import PackedMethod

pytestmark = pytest.mark.slow
RULES = ("self_attn\\..*=int8", "mlp\\.down_proj=nf4")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, default_source):
    cfg = EngineConfig(model="smollm2-135m", quant="int4-g64", rules=RULES, max_model_len=512)
    loaded = build.load(cfg, progress=False, prepare=False)
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-int4"
    save_checkpoint(loaded.model, loaded.tokenizer, out, "smollm2-135m")
    return loaded, out


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_reload_is_bit_identical_and_skips_quantization(saved, monkeypatch):
    loaded, path = saved
    calls = []
    for cls in _all_subclasses(PackedMethod):  # the low-bit formats: no rounding again
        if "quantize" in vars(cls):
            monkeypatch.setattr(cls, "quantize", lambda self, w, _c=calls: _c.append(1))
    again = build.load(EngineConfig(model=str(path), max_model_len=512), progress=False, prepare=False)
    assert calls == []
    want, got = loaded.model.quant_linears(), again.model.quant_linears()
    assert want.keys() == got.keys()
    for name, lin in want.items():
        assert str(got[name].spec) == str(lin.spec), name
        for key, t in lin.method.stored.items():
            assert torch.equal(got[name].method.stored[key], t), f"{name}.{key}"


def test_checkpoint_records_formats(saved):
    _, path = saved
    data = json.loads((path / "nibble_quant.json").read_text())
    mods = data["modules"]
    assert mods["layers.0.self_attn.qkv_proj"]["format"] == "int8"
    assert mods["layers.0.mlp.gate_up_proj"]["format"] == "int4-g64"
    assert mods["layers.0.mlp.down_proj"]["format"] == "nf4"
    assert "lm_head" not in mods  # tied and 16-bit: rebuilt from the embedding


def test_checkpoint_generates_like_the_original(saved):
    _, path = saved
    params = SamplingParams(max_tokens=12, temperature=0)
    direct = LLM("smollm2-135m", quant="int4-g64", rules=RULES, progress=False, max_model_len=512)
    reloaded = LLM(str(path), progress=False, max_model_len=512)
    prompt = "The capital of France is"
    assert reloaded.generate(prompt, params)[0].token_ids == direct.generate(prompt, params)[0].token_ids


def test_requantizing_a_checkpoint_is_refused(saved):
    from engine.errors import ConfigError

    _, path = saved
    with pytest.raises(ConfigError, match="already quantized"):
        build.load(EngineConfig(model=str(path), quant="int8"), progress=False)
