"""SmoothQuant (`nibble quantize --method smoothquant`) on a 2-layer random Llama whose inputs
of q|k|v, gate|up and down carry planted outlier features (the model's function unchanged):
smoothing keeps the float model's logits and, at alpha 0.5, gives each smoothed feature equal
activation and weight ranges; s matches a hand computation; the smoothed w8a8 model is closer
to the float model than plain w8a8 (dynamic and static activation scales); a checkpoint
reloads with bit-identical stored tensors and logits; usage errors exit 2 with one line."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from engine import LLM, build
from engine.calibrate import collect_absmax
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.eval.texts import calibration_text, corpus_chunks, corpus_text
from engine.quant import smoothquant
from engine.quant.smoothquant import save, smooth_model, smooth_scales, w8a8_model
from server.cli import main
from tests.engine.fused import tied_copy

OUTLIER = 64.0  # a power of two: planting it changes no value of the float model
FEATURES = [3, 17, 40]  # of hidden (64) and intermediate (96) features
CTX = 64
SMOOTHED = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, tmp_path_factory):
    """tiny_llama with FEATURES of each layer's input_layernorm and post_attention_layernorm
    weights, and of up's rows, times OUTLIER, and the same input columns of q/k/v, gate/up and
    down divided by it: the same function, with outlier features in every smoothed input."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("outlier-llama")
    for f in tiny_llama.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    t = load_file(out / "model.safetensors")
    for i in range(2):
        p = f"model.layers.{i}"
        for norm, projs in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            t[f"{p}.{norm}.weight"][FEATURES] *= OUTLIER
            for proj in projs:
                t[f"{p}.{proj}.weight"][:, FEATURES] /= OUTLIER
        t[f"{p}.mlp.up_proj.weight"][FEATURES] *= OUTLIER
        t[f"{p}.mlp.down_proj.weight"][:, FEATURES] /= OUTLIER
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _llm(path, quant: str | None = None) -> LLM:
    return LLM(str(path), quant=quant, progress=False, max_model_len=256, kv_cache_memory=2e7)


def _logits(llm: LLM, chunks: list[list[int]]) -> torch.Tensor:
    return torch.cat([llm.score(c) for c in chunks])


@pytest.fixture(scope="module")
def text_chunks(outlier_llama):
    """(3 calibration chunks of CTX tokens, 2 held-out chunks of other text)."""
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer("hf", outlier_llama)
    return (corpus_chunks(tok, calibration_text("builtin")[0], CTX, 3),
            corpus_chunks(tok, corpus_text("builtin")[0], CTX, 2))


@pytest.fixture(scope="module")
def run(outlier_llama, text_chunks):
    """One fp32 model, smoothed in place: its held-out logits, activation maxima and weights
    before and after, and s."""
    calib, held_out = text_chunks
    llm = _llm(outlier_llama, "fp32")
    r = {"before": _logits(llm, held_out), "absmax": collect_absmax(llm, calib, progress=False),
         "weights": {n: m.method.dequantize().clone() for n, m in llm.model.quant_linears().items()}}
    r["s"] = smooth_model(llm.model, r["absmax"], 0.5, progress=False)
    r["after"] = _logits(llm, held_out)
    r["absmax_after"] = collect_absmax(llm, calib, progress=False)
    r["weights_after"] = {n: m.method.dequantize() for n, m in llm.model.quant_linears().items()}
    return r


@pytest.fixture(scope="module")
def w8a8(outlier_llama, text_chunks, tmp_path_factory):
    """w8a8 models of one fp32 model, plain and smoothed (alpha 0.5), with dynamic and static
    activation scales: in memory, their stored tensors, and saved."""
    calib = text_chunks[0]
    llm = _llm(outlier_llama, "fp32")
    plain_static = collect_absmax(llm, calib, per_feature=False, progress=False)
    models = {"plain-dynamic": w8a8_model(llm.model),
              "plain-static": w8a8_model(llm.model, plain_static, progress=False)}
    models["smooth-static"] = smoothquant.smoothquant(llm, calib, 0.5, "static", progress=False)
    models["smooth-dynamic"] = w8a8_model(llm.model, progress=False)  # llm is smoothed now
    r = {"models": models, "dirs": {},
         "static_absmax": collect_absmax(llm, calib, per_feature=False, progress=False),
         "stored": {k: {n: dict(lin.method.stored) for n, lin in m.quant_linears().items()}
                    for k, m in models.items()}}
    for kind, model in models.items():
        r["dirs"][kind] = tmp_path_factory.mktemp(kind) / "ckpt"
        save(model, llm.tokenizer, r["dirs"][kind], str(outlier_llama), {"alpha": 0.5})
    return r


def test_smoothing_keeps_the_float_models_logits(run):
    before, after = run["before"], run["after"]
    assert after.abs().max() > 0.1  # a real signal, not a vanishing model
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_at_alpha_half_each_smoothed_feature_has_equal_activation_and_weight_ranges(run):
    """max|X'_j| = max|X_j| / s_j and max|W'_j| = max|W_j| s_j, both sqrt(max|X_j| max|W_j|)."""
    for i in range(2):
        for proj in SMOOTHED:
            name = f"layers.{i}.{proj}"
            x, w = run["absmax_after"][name], run["weights_after"][name].abs().amax(0)
            torch.testing.assert_close(x, w, rtol=1e-5, atol=0)
            torch.testing.assert_close(x, run["absmax"][name] / run["s"][name], rtol=1e-5, atol=0)
            # the planted features were the loud ones: they get the largest s
            s = run["s"][name]
            assert s[FEATURES].min() > 4 * s[[j for j in range(len(s)) if j not in FEATURES]].max()
        o_proj = f"layers.{i}.self_attn.o_proj"  # not smoothed
        assert torch.equal(run["weights_after"][o_proj], run["weights"][o_proj])


def test_scales_match_a_hand_computation():
    x = torch.tensor([4.0, 1.0, 0.0, 9.0, 2.0, 1e-12])
    w = torch.tensor([[2.0, -1.0, 3.0, 1.0, 0.0, 5.0],
                      [-8.0, 0.5, 1.0, -1.0, 0.0, -2.0]])  # max |w_j|: 8, 1, 3, 1, 0, 5
    # features 2 (never fired) and 4 (zero column) keep 1; feature 5 is clamped to 1e-5
    want = {0.5: [math.sqrt(4 / 8), 1.0, 1.0, 3.0, 1.0, 1e-5],
            1.0: [4.0, 1.0, 1.0, 9.0, 1.0, 1e-5],
            0.0: [1 / 8, 1.0, 1.0, 1.0, 1.0, 1 / 5]}
    for alpha, s in want.items():
        torch.testing.assert_close(smooth_scales(x, w, alpha), torch.tensor(s), rtol=1e-6, atol=0)
    big = smooth_scales(torch.tensor([1e12]), torch.tensor([[1e-3]]), 1.0)
    assert big.item() == 1e5


def test_qkv_shares_one_scale_over_q_k_and_v_rows(run):
    """s of q|k|v uses max|W_j| over all three: recomputed from the original fused weight."""
    name = "layers.0.self_attn.qkv_proj"
    w = run["weights"][name]
    want = run["absmax"][name].sqrt() / w.abs().amax(0).sqrt()
    torch.testing.assert_close(run["s"][name], want, rtol=1e-6, atol=0)
    q_only = run["absmax"][name].sqrt() / w[:64].abs().amax(0).sqrt()
    assert not torch.allclose(run["s"][name], q_only)


def _rel_error(logits: torch.Tensor, ref: torch.Tensor) -> float:
    centred = ref - ref.mean(-1, keepdim=True)
    return float((logits - ref).norm() / centred.norm())


@pytest.mark.parametrize("scales", ["dynamic", "static"])
def test_smoothed_w8a8_is_closer_to_the_float_model_than_plain_w8a8(run, w8a8, text_chunks,
                                                                   scales):
    held_out = text_chunks[1]
    err = {kind: _rel_error(_logits(_llm(w8a8["dirs"][f"{kind}-{scales}"]), held_out), run["before"])
           for kind in ("plain", "smooth")}
    assert err["smooth"] < 0.25 * err["plain"], err


def test_plain_w8a8_from_the_quant_flag_matches_the_unsmoothed_checkpoint(w8a8, outlier_llama,
                                                                        text_chunks):
    held_out = text_chunks[1]
    assert torch.equal(_logits(_llm(outlier_llama, "w8a8"), held_out),
                       _logits(_llm(w8a8["dirs"]["plain-dynamic"]), held_out))


@pytest.mark.parametrize("scales", ["dynamic", "static"])
def test_checkpoint_reloads_bit_identical(w8a8, scales, text_chunks, monkeypatch):
    run, kind, held_out = w8a8, f"smooth-{scales}", text_chunks[1]
    path, model = run["dirs"][kind], run["models"][kind]
    loaded = build.load(EngineConfig(model=str(path)), progress=False, prepare=False)
    for name, lin in loaded.model.quant_linears().items():
        want = run["stored"][kind][name]
        assert lin.method.stored.keys() == want.keys(), name
        assert ("input_scale" in want) == (scales == "static" and name != "lm_head"), name
        for key, t in want.items():
            assert t.dtype == lin.method.stored[key].dtype and torch.equal(
                t, lin.method.stored[key]), (name, key)
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(loaded.model.named_parameters())[name]), name
    if scales == "static":
        for name, stored in run["stored"][kind].items():
            if name != "lm_head":
                torch.testing.assert_close(stored["input_scale"] * 127,
                                           run["static_absmax"][name], rtol=1e-6, atol=0)
    reloaded = _logits(_llm(path), held_out)

    real_load = build.load

    def in_memory(cfg, progress=True, prepare=True):  # the model as it was before saving
        model.prepare(torch.device(cfg.device))
        return dataclasses.replace(real_load(cfg, progress, prepare=False), model=model)

    monkeypatch.setattr(build, "load", in_memory)
    assert torch.equal(_logits(_llm(path), held_out), reloaded)


def test_static_and_dynamic_scales_give_different_models(w8a8, text_chunks):
    held_out = text_chunks[1]
    assert not torch.equal(_logits(_llm(w8a8["dirs"]["smooth-static"]), held_out),
                           _logits(_llm(w8a8["dirs"]["smooth-dynamic"]), held_out))


def test_quantize_smoothquant_from_the_command_line(outlier_llama, text_chunks, tmp_path, capsys):
    tied, out = tied_copy(outlier_llama, tmp_path / "tied"), tmp_path / "sq"
    assert main(["quantize", "--method", "smoothquant", "-m", str(tied), "--alpha", "0.75",
                 "--act-scales", "static", "--calib-tokens", "128", "--calib-ctx", str(CTX),
                 "--out", str(out)]) == 0
    assert "w8a8" in capsys.readouterr().out
    quant = json.loads((out / "nibble_quant.json").read_text())
    assert quant["smoothquant"] == {"alpha": 0.75, "act_scales": "static",
                                    "calibration": "builtin:stdlib docstrings",
                                    "calibration_tokens": 128}
    formats = {n: m["format"] for n, m in quant["modules"].items()}  # lm_head: the embedding
    assert len(formats) == 8 and set(formats.values()) == {"w8a8"}, formats
    loaded = build.load(EngineConfig(model=str(out)), progress=False, prepare=False)
    assert all("input_scale" in loaded.model.get_submodule(n).method.stored for n in formats)
    assert loaded.model.lm_head_shares_embedding()
    assert _logits(_llm(out), text_chunks[1][:1]).isfinite().all()
    assert main(["quantize", "-m", str(tied), "-q", "w8a8", "--out", str(tmp_path / "rtn")]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--method", "smoothquant", "--alpha", "1.5"], "--alpha 1.5: SmoothQuant's migration"),
    (["--method", "smoothquant", "--alpha", "-0.1"], "--alpha -0.1"),
    (["--method", "smoothquant", "--alpha", "nan"], "--alpha nan"),
    (["--method", "gptq", "--act-scales", "static"], "--act-scales is a SmoothQuant option"),
    (["--alpha", "0.5"], "--alpha is a SmoothQuant option"),
    (["--method", "smoothquant", "--bits", "8"], "--bits does not apply to --method smoothquant"),
    (["--method", "smoothquant", "--group-size", "64"], "--group-size does not apply"),
    (["--method", "smoothquant", "--act-order"], "--act-order does not apply"),
    (["--method", "smoothquant", "-q", "int4"], "drop --quant and --rule"),
    (["--method", "smoothquant", "-r", "mlp=int8"], "drop --quant and --rule"),
    (["--method", "smoothquant", "--calib-tokens", "8"], "--calib-tokens 8"),
    (["--method", "smoothquant", "--calib", "/nonexistent/calib.txt"], "cannot read the corpus"),
])
def test_quantize_smoothquant_usage_errors(tmp_path, capsys, flags, message):
    assert main(["quantize", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nibble: error: ") and message in err, err
    assert err.count("\n") == 1, err


def test_library_refuses_bad_alpha_and_act_scales(run):
    with pytest.raises(ConfigError, match="alpha 2"):
        smooth_model(None, run["absmax"], 2.0)
    with pytest.raises(ConfigError, match="act_scales 'per-block'"):
        smoothquant.smoothquant(None, [], act_scales="per-block")


def test_smoothing_a_16_bit_model_changes_its_logits_by_its_own_rounding_only(
        run, outlier_llama, text_chunks):
    """bf16 linear weights: W' = W diag(s) is rounded to bf16 again, so the logits move by
    about what bf16 storage already costs against fp32, no more."""
    calib, held_out = text_chunks
    llm = _llm(outlier_llama, "bf16")
    plain = _logits(llm, held_out)
    smooth_model(llm.model, collect_absmax(llm, calib, progress=False), 0.5, progress=False)
    smoothed = _logits(llm, held_out)
    bf16_error = (plain - run["before"]).abs().max()
    assert (smoothed - plain).abs().max() > 0  # the weights were smoothed
    assert (smoothed - run["before"]).abs().max() < 2 * bf16_error
