"""`--quant gguf`: a GGUF file served on its own blocks. Q4_0, Q4_1 and Q8_0 repack into int4-g32
and int8-g32 with every value equal to the gguf package's dequantization; other types are read
through that dequantization and quantized by nibble. The default model serves on its own Q4_1
blocks, as close to the float32 model as bf16 is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants

from engine import build
from engine.config import EngineConfig, QuantPolicy
from engine.errors import ConfigError
from engine.eval.stats import token_stats
from engine.eval.texts import corpus_chunks, corpus_text
from engine.loader import config_from_gguf, gguf_policy, gguf_tensors, load_gguf_native, route
from engine.models.llama import LlamaModel
from engine.quant import gguf as G
from kernels import reference as R


def _rows(n: int, k: int, seed: int) -> np.ndarray:
    """Weights whose rows differ in scale and offset, as trained weights do."""
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, k)) * g.uniform(0.01, 0.2, (n, 1)) + g.uniform(-0.05, 0.05, (n, 1))
            ).astype(np.float32)


def _ours(stored: dict, spec, K: int) -> torch.Tensor:
    fn = R.dequantize_int4 if spec.format == "int4" else R.dequantize_int8g
    return fn(stored["qweight"], stored["scales"], stored["zeros"], 32, K)


@pytest.mark.parametrize("qtype, spec", [(T.Q4_0, G.INT4_G32), (T.Q4_1, G.INT4_G32),
                                         (T.Q8_0, G.INT8_G32), (T.Q4_0, G.INT8_G32),
                                         (T.Q4_1, G.INT8_G32)], ids=str)
def test_blocks_repack_to_the_gguf_packages_values_exactly(qtype, spec):
    blocks = quants.quantize(_rows(48, 320, qtype.value), qtype)
    stored, inexact = G.convert(qtype.name, blocks, 48, 320, spec)
    want = torch.from_numpy(quants.dequantize(blocks, qtype).copy())
    assert inexact == 0
    assert torch.equal(_ours(stored, spec, 320), want)


def test_a_hand_built_q4_1_block():
    """d = 0.5, m = -1, codes 0..15 then 15..0: weight j is the low nibble of byte j (j < 16),
    else the high nibble of byte j - 16."""
    q = np.array(list(range(16)) + list(range(15, -1, -1)), dtype=np.uint8)
    block = np.concatenate([np.array([0.5, -1.0], dtype=np.float16).view(np.uint8),
                            q[:16] | (q[16:] << 4)])
    stored, _ = G.convert("Q4_1", block[None], 1, 32, G.INT4_G32)
    assert R.unpack_nibbles(stored["qweight"], 32)[0].tolist() == q.tolist()
    assert (stored["scales"].item(), stored["zeros"].item()) == (0.5, 3.0)  # m + 8 d
    assert _ours(stored, G.INT4_G32, 32)[0].tolist() == [0.5 * c - 1.0 for c in q.tolist()]


def test_a_zero_that_float32_cannot_hold_is_counted():
    block = np.concatenate([np.array([1.0, 2.0**-22], dtype=np.float16).view(np.uint8),
                            np.zeros(16, np.uint8)])
    _, inexact = G.convert("Q4_1", np.stack([block, block]), 1, 64, G.INT4_G32)
    assert inexact == 2  # 8 + 2**-22 needs 26 significant bits


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="whole number of blocks"):
        G.convert("Q8_0", np.zeros((1, 34), np.uint8), 1, 31, G.INT8_G32)


@pytest.mark.parametrize("types, spec, native", [
    (["Q4_1"], "int4-g32", True), (["Q4_0", "Q4_1", "Q4_0"], "int4-g32", True),
    (["Q8_0", "Q4_1", "Q4_0"], "int8-g32", True), (["F16"], None, True),
    (["Q4_K", "Q4_0"], "int4-g32", False), (["Q6_K"], "int8-g32", False),
    (["Q5_0"], "int8-g32", False), (["F32", "Q4_0"], "int8-g32", False),
])
def test_each_module_gets_the_format_its_blocks_fit(types, spec, native):
    got, repacked = G.native_spec(types)
    assert (None if got is None else str(got), repacked) == (spec, native)


# --- a small GGUF file of mixed types --------------------------------------------------------

H, F, V = 256, 256, 64  # K-quants need rows of 256


def _k_quant(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks with finite fp16 super-block scales (0.01; Q4_K's dmin too)."""
    size = quants.GGML_QUANT_SIZES[qtype][1]
    data = np.random.default_rng(seed).integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
    d = np.array([0.01], dtype=np.float16).view(np.uint8)
    if qtype == T.Q4_K:
        data[:, 0:2] = d
        data[:, 2:4] = d
    else:  # Q6_K: ql, qh, 16 int8 scales, then d
        data[:, -2:] = d
    return data.reshape(rows, -1)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 128), ("embedding_length", H),
                       ("feed_forward_length", F), ("head_count", 4), ("head_count_kv", 2),
                       ("layer_norm_rms_eps", 1e-5), ("vocab_size", V)):
        getattr(w, f"add_{key}")(value)
    tensors = {
        "token_embd.weight": _rows(V, H, 1).astype(np.float16),
        "output.weight": quants.quantize(_rows(V, H, 2), T.Q8_0),
        "output_norm.weight": np.ones(H, np.float32),
        "blk.0.attn_norm.weight": np.ones(H, np.float32),
        "blk.0.ffn_norm.weight": np.ones(H, np.float32),
        "blk.0.attn_q.weight": quants.quantize(_rows(H, H, 3), T.Q8_0),
        "blk.0.attn_k.weight": quants.quantize(_rows(128, H, 4), T.Q4_0),
        "blk.0.attn_v.weight": quants.quantize(_rows(128, H, 5), T.Q4_1),
        "blk.0.attn_output.weight": quants.quantize(_rows(H, H, 6), T.Q4_1),
        "blk.0.ffn_gate.weight": _k_quant(T.Q4_K, F, H, 7),
        "blk.0.ffn_up.weight": quants.quantize(_rows(F, H, 8), T.Q4_0),
        "blk.0.ffn_down.weight": _k_quant(T.Q6_K, H, F, 9),
    }
    types = {"blk.0.ffn_gate.weight": T.Q4_K, "blk.0.ffn_down.weight": T.Q6_K,
             "blk.0.attn_q.weight": T.Q8_0, "output.weight": T.Q8_0,
             "blk.0.attn_k.weight": T.Q4_0, "blk.0.ffn_up.weight": T.Q4_0,
             "blk.0.attn_v.weight": T.Q4_1, "blk.0.attn_output.weight": T.Q4_1}
    for name, data in tensors.items():
        w.add_tensor(name, data, raw_dtype=types.get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load_native(path, rules=()):
    reader = GGUFReader(str(path))
    cfg = config_from_gguf(reader)
    policy, native = gguf_policy(reader, QuantPolicy.build("gguf", rules), cfg.tie_word_embeddings)
    model = LlamaModel(cfg, policy, 64, torch.float32)
    load_gguf_native(model, reader, native, progress=False)
    return model, policy, native, _float_weights(reader, cfg)


def _float_weights(reader, cfg) -> dict[str, torch.Tensor]:
    """{our module: its weight as the gguf package dequantizes the file (q/k rows un-permuted)}."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for name, w in gguf_tensors(reader, cfg):
        target = route(name)
        if target and target[1] == "weight" and target[2] is not None:
            shards.setdefault(target[0], {})[target[2]] = w
    return {m: torch.cat([s[i] for i in sorted(s)]) for m, s in shards.items()}


def test_a_mixed_file_loads_each_module_in_its_format(mixed_gguf):
    model, policy, native, want = _load_native(mixed_gguf)
    linears = model.quant_linears()
    formats = {n: str(m.spec) for n, m in linears.items()}
    assert formats == {"lm_head": "int8-g32", "layers.0.self_attn.qkv_proj": "int8-g32",
                       "layers.0.self_attn.o_proj": "int4-g32",
                       "layers.0.mlp.gate_up_proj": "int4-g32",
                       "layers.0.mlp.down_proj": "int8-g32"}
    assert native == {"lm_head", "layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj"}
    for name in native:  # Q8_0 + Q4_0 + Q4_1 joined as int8-g32: still exact
        assert torch.equal(linears[name].method.dequantize(), want[name]), name
    for name in set(linears) - native:  # K-quants: requantized by round to nearest
        got, w = linears[name].method.dequantize(), want[name]
        step = (w.view(w.shape[0], -1, 32).amax(2) - w.view(w.shape[0], -1, 32).amin(2))
        levels = 15 if str(linears[name].spec).startswith("int4") else 255
        bound = (step / levels / 2).repeat_interleave(32, dim=1) * 1.001 + 1e-7
        assert ((got - w).abs() <= bound).all(), name
    assert policy.describe() == ("gguf (int4-g32 x1, int4-g32 requantized x1, int8-g32 x2, "
                                 "int8-g32 requantized x1)")


def test_rules_override_the_files_formats(mixed_gguf):
    model, policy, native, want = _load_native(mixed_gguf, ["self_attn\\..*=bf16"])
    linears = model.quant_linears()
    assert str(linears["layers.0.self_attn.qkv_proj"].spec) == "bf16"
    assert "layers.0.self_attn.qkv_proj" not in native and "lm_head" in native
    torch.testing.assert_close(linears["layers.0.self_attn.qkv_proj"].method.dequantize(),
                               want["layers.0.self_attn.qkv_proj"], rtol=2**-8, atol=0)


# --- the default model -----------------------------------------------------------------------


def test_the_default_model_loads_its_own_q4_1_blocks_exactly(default_source):
    loaded = build.load(EngineConfig(quant="gguf"), progress=False, prepare=False)
    linears = loaded.model.quant_linears()
    want = _float_weights(GGUFReader(str(default_source.path)), loaded.config)
    assert loaded.policy.describe() == "gguf (int4-g32 x120)"
    assert str(linears.pop("lm_head").spec) == "bf16"  # tied to the Q8_0 embedding: 16-bit
    assert set(linears) == set(want)
    for name, lin in linears.items():
        assert str(lin.spec) == "int4-g32"
        assert torch.equal(lin.method.dequantize(), want[name]), name


def test_the_default_model_serves_on_its_blocks_as_close_as_bf16(llm_factory):
    """Teacher-forced on held-out text against the float32 model: the CPU op rounds d and
    m + 8d to bf16, which costs about what bf16 weights cost; int4 g128 costs 100x more."""
    ref_llm = llm_factory("fp32")
    (chunk,) = corpus_chunks(ref_llm.tokenizer, corpus_text("builtin")[0], 256, 2)[1:]
    target = torch.tensor(chunk[1:])
    ref = ref_llm.score(chunk)[:-1]
    kld = {q: token_stats(ref, llm_factory(q).score(chunk)[:-1], target).kld.mean().item()
           for q in ("gguf", "bf16", "int4")}
    assert kld["gguf"] < 2 * kld["bf16"] and kld["gguf"] < kld["int4"] / 20, kld


def test_gguf_on_a_safetensors_model_is_a_usage_error(tiny_llama):
    with pytest.raises(ConfigError, match="own blocks"):
        build.load(EngineConfig(model=str(tiny_llama), quant="gguf"), progress=False)
