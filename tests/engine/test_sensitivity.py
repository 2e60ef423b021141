"""`nibble plan`'s library: the sensitivity scan on a 2-layer random Llama in which one module
was made sensitive on purpose (function kept, its 4-bit rounding made coarse), the knapsack
against brute force, and a written plan that loads with the planned formats and bytes."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tomllib
import warnings

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from engine import LLM
from engine.config import EngineConfig, QuantPolicy, QuantSpec
from engine.config_files import read_config
from engine.errors import ConfigError
from engine.eval import stats
from engine.eval.texts import calibration_text, corpus_chunks
from engine.report import total_bytes
from engine.sensitivity.budget import knapsack, plan, plan_rules, toml_string, write_plan
from engine.sensitivity.plot import DPI, FIGSIZE, write_scan_png
from engine.sensitivity.reference import Reference, kld_rows
from engine.sensitivity.results import WIDE, Scan, format_table
from engine.sensitivity.scan import module_groups
from engine.sensitivity.scan import scan as run_scan
from tests.engine.fused import tied_copy

FORMATS = ("int4-g32", "int8", "nf4-g32")
SENSITIVE = "layers.1.mlp.down_proj"
OUTLIER = 1024.0  # a power of two: scaling by it and back is exact in fp32
CTX, CHUNKS = 64, 4


@pytest.fixture(scope="module")
def sensitive_llama(tiny_llama, tmp_path_factory):
    """tiny_llama with inputs 0, 32 and 64 of layers.1's down_proj scaled by OUTLIER and the
    same rows of up_proj divided by it: silu(gate) * up is down's input, so the model computes
    the same function, but every group of 32 inputs of down_proj now holds one outlier that
    stretches the 4-bit grid of the other 31 weights of its row."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("sensitive-llama")
    for f in tiny_llama.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    tensors = load_file(out / "model.safetensors")
    cols = [0, 32, 64]
    tensors["model.layers.1.mlp.down_proj.weight"][:, cols] *= OUTLIER
    tensors["model.layers.1.mlp.up_proj.weight"][cols] /= OUTLIER
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tied_llama(tiny_llama, tmp_path_factory):
    """tiny_llama with its lm_head tied to the embedding, as the default model's is."""
    return tied_copy(tiny_llama, tmp_path_factory.mktemp("tied-llama"))


@pytest.fixture(scope="module")
def reference(sensitive_llama):
    llm = LLM(str(sensitive_llama), quant="fp32", progress=False, max_model_len=256,
              kv_cache_memory=2e7)
    chunks = corpus_chunks(llm.tokenizer, calibration_text("builtin")[0], CTX, CHUNKS)
    return llm, chunks


@pytest.fixture(scope="module")
def scanned(reference) -> Scan:
    llm, chunks = reference
    return run_scan(llm, chunks, FORMATS, progress=False, calibration="builtin")


def test_replay_from_any_layer_reproduces_the_reference(reference):
    """Unchanged weights replayed from every layer (and from lm_head) give KLD exactly 0, and
    the reference's logits are those `nibble compare` scores (llm.score, one chunk a call)."""
    llm, chunks = reference
    with torch.inference_mode():
        ref = Reference(llm.model, chunks, batch_tokens=2 * CTX)  # 2 flat batches of 2 chunks
        assert len(ref.passes) == 2
        for layer in range(len(llm.model.layers) + 1):
            means, sizes = ref.kld(layer)
            assert means.tolist() == [0.0] * CHUNKS and sizes.tolist() == [CTX // 2] * CHUNKS
    scored = torch.cat([llm.score(c)[CTX // 2 - 1:-1] for c in chunks])
    torch.testing.assert_close(torch.cat([p.logits for p in ref.passes]), scored,
                               rtol=1e-4, atol=1e-4)


def test_kld_rows_matches_token_stats():
    g = torch.Generator().manual_seed(0)
    a = 4 * torch.randn(6, 5000, generator=g)
    b = a + torch.randn(6, 5000, generator=g)  # KLD ~ 0.5
    near = a + 1e-3 * torch.randn(6, 5000, generator=g)  # KLD ~ 5e-7
    wild = a.clone()
    wild[:, 7] += 100.0  # B puts all its mass where A puts almost none: the float64 path
    y = torch.zeros(6, dtype=torch.long)
    probs = torch.softmax(a, -1)
    for other in (b, near, wild):  # fp32 sums over 5000 values: ~1e-9 nats of rounding
        want = stats.token_stats(a, other, y).kld
        torch.testing.assert_close(kld_rows(probs, a, other.clone()), want, rtol=1e-5, atol=2e-9)
    assert kld_rows(probs, a, a.clone()).tolist() == [0.0] * 6


def test_scan_ranks_the_outlier_module_most_sensitive(reference, scanned):
    llm, _ = reference
    assert [m.name for m in scanned.modules] == module_groups(llm.model)
    assert scanned.formats == FORMATS and scanned.scored_tokens == CHUNKS * CTX // 2
    print(format_table(scanned))
    # measured: int4-g32 10x the next module (lm_head), int8 350x, nf4-g32 1.6x (its grid
    # holds 0, so the outliers zero the other weights instead of shifting them)
    for fmt, margin in (("int4-g32", 3), ("int8", 3), ("nf4-g32", 1)):
        (first, k1), (_, k2) = scanned.ranked(fmt)[:2]
        assert first == SENSITIVE and k1 > margin * k2, scanned.ranked(fmt)[:3]
    for m in scanned.modules:
        lin = llm.model.get_submodule(m.name)
        assert m.wide_bytes == 2 * lin.in_features * lin.out_features  # no bias, not tied
        for o in m.options:
            assert o.kld > 0 and o.kld_ci95[0] <= o.kld <= o.kld_ci95[1]
            assert 0 < o.nbytes < m.wide_bytes
    # int8 rounds finer than 4 bits, on every module
    assert all(m.options[1].kld < m.options[0].kld for m in scanned.modules)


def test_scan_json_round_trips_and_bad_files_are_config_errors(scanned):
    assert Scan.from_json(scanned.to_json()) == scanned
    for text in ("not json", "{}", '{"schema": "nibble.scan/1"}', "[]",
                 scanned.to_json().replace('"bytes": ', '"bytes": "x", "b": '),
                 scanned.to_json().replace('"modules"', '"mods"')):
        with pytest.raises(ConfigError):
            Scan.from_json(text)


def test_scan_takes_quantized_formats_only(reference):
    llm, chunks = reference
    with pytest.raises(ConfigError, match="float format"):
        run_scan(llm, chunks, ["int8", "bf16"], progress=False)


def _floor(scan: Scan) -> int:
    return scan.fixed_bytes + sum(min([m.wide_bytes] + [o.nbytes for o in m.options])
                                  for m in scan.modules)


def test_plan_respects_the_budget(scanned):
    floor, full = _floor(scanned), scanned.fixed_bytes + sum(m.wide_bytes for m in scanned.modules)
    for budget in np.linspace(floor, full, 7).astype(int):
        for bins in (7, 1 << 15):  # coarse bins give up room, never the budget
            p = plan(scanned, int(budget), bins=bins)
            assert p.nbytes <= budget and p.fixed_bytes == scanned.fixed_bytes
            assert p.nbytes == p.fixed_bytes + sum(_bytes(scanned, n, f)
                                                   for n, f in p.assignment.items())
    assert set(plan(scanned, full).assignment.values()) == {WIDE}
    with pytest.raises(ConfigError, match=f"needs {floor:,} bytes"):
        plan(scanned, floor - 1)


def _bytes(scan: Scan, name: str, fmt: str) -> int:
    m = next(m for m in scan.modules if m.name == name)
    return m.wide_bytes if fmt == WIDE else next(o.nbytes for o in m.options if o.format == fmt)


def test_plan_keeps_the_sensitive_module_wide_when_one_can_stay(scanned):
    """Options 16-bit or int4-g32; the budget fits every module at int4-g32 plus what keeping
    the sensitive one 16-bit costs."""
    only4 = dataclasses.replace(scanned, formats=("int4-g32",), modules=tuple(
        dataclasses.replace(m, options=m.options[:1]) for m in scanned.modules))
    sens = next(m for m in only4.modules if m.name == SENSITIVE)
    budget = _floor(only4) + sens.saved(sens.options[0])
    p = plan(only4, budget)
    assert p.assignment == {m.name: WIDE if m.name == SENSITIVE else "int4-g32"
                            for m in only4.modules}
    assert p.nbytes == budget
    assert p.kld == pytest.approx(sum(m.options[0].kld for m in only4.modules)
                                  - sens.options[0].kld)


def test_written_plan_loads_with_the_planned_formats_and_bytes(scanned, tmp_path):
    floor, full = _floor(scanned), scanned.fixed_bytes + sum(m.wide_bytes for m in scanned.modules)
    p = plan(scanned, floor + (full - floor) // 4)
    assert len(set(p.assignment.values())) >= 2, p.assignment
    path = write_plan(tmp_path / "plans" / "plan.toml", scanned.model, p, ["scan: test"])
    text = path.read_text()
    assert f"{p.nbytes:,} bytes" in text and "# scan: test" in text
    cfg = EngineConfig.from_dict(read_config(str(path)))
    llm = LLM(config=cfg, progress=False)
    for name, lin in llm.model.quant_linears().items():
        assert lin.spec == QuantSpec.parse(p.assignment[name]), name
    assert total_bytes(llm.model) == p.nbytes


def test_tied_lm_head_costs_nothing_wide_and_the_plan_counts_it_so(tied_llama, tmp_path):
    """Quantizing a tied lm_head adds its bytes (the 16-bit one is the embedding's storage);
    a plan's bytes are what the loaded plan holds, tied lm_head included."""
    llm = LLM(str(tied_llama), quant="fp32", progress=False, max_model_len=256,
              kv_cache_memory=2e7)
    chunks = corpus_chunks(llm.tokenizer, calibration_text("builtin")[0], 32, 2)
    scanned = run_scan(llm, chunks, ["int8"], progress=False)
    head = scanned.modules[-1]
    assert head.name == "lm_head" and head.wide_bytes == 0 and head.saved(head.options[0]) < 0
    p = plan(scanned, _floor(scanned))  # every module int8 but lm_head
    assert p.assignment["lm_head"] == WIDE and set(p.assignment.values()) == {WIDE, "int8"}
    path = write_plan(tmp_path / "plan.toml", scanned.model, p)
    loaded = LLM(config=EngineConfig.from_dict(read_config(str(path))), progress=False)
    assert loaded.model.lm_head_shares_embedding()
    assert total_bytes(loaded.model) == p.nbytes


def test_plan_rules_give_each_module_its_format():
    assignment = {"layers.1.mlp.down_proj": "int8", "layers.11.mlp.down_proj": "int4-g32",
                  "layers.1.self_attn.o_proj": "int4-g32", "layers.2.self_attn.o_proj": WIDE,
                  "lm_head": "int8"}
    for default in ("int4-g32", WIDE, "int8"):
        rules = plan_rules(assignment, default)
        policy = QuantPolicy.build(default, rules)
        assert {n: policy.spec_for(n) for n in assignment} == {
            n: QuantSpec.parse(f) for n, f in assignment.items()}
    assert plan_rules(assignment, "int4-g32") == [
        r"^layers\.1\.mlp\.down_proj$=int8", r"^layers\.2\.self_attn\.o_proj$=bf16",
        r"^lm_head$=int8"]


@pytest.mark.parametrize("text", ["smollm2-135m", r"C:\models\it's", 'a"b\\c', "tab\there",
                                  "line\nbreak", "ünï\x7f\x01"])
def test_toml_string_round_trips(text):
    assert tomllib.loads(f"x = {toml_string(text)}")["x"] == text


def _brute_force(costs, values, capacity):
    best = min(sum(v[j] for v, j in zip(values, pick, strict=True))
               for pick in itertools.product(*(range(len(c)) for c in costs))
               if sum(c[j] for c, j in zip(costs, pick, strict=True)) <= capacity)
    return best


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        costs = [np.concatenate([[0], rng.integers(0, 300, rng.integers(1, 4))]) for _ in range(5)]
        values = [rng.random(len(c)) for c in costs]
        capacity = int(rng.integers(0, sum(int(c.max()) for c in costs) + 1))
        picks = knapsack(costs, values, capacity)
        assert sum(c[j] for c, j in zip(costs, picks, strict=True)) <= capacity
        got = sum(v[j] for v, j in zip(values, picks, strict=True))
        assert got == pytest.approx(_brute_force(costs, values, capacity), abs=1e-12)
        coarse = knapsack(costs, values, capacity, bins=3)
        assert sum(c[j] for c, j in zip(costs, coarse, strict=True)) <= capacity


def test_scan_png(scanned, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_scan_png(tmp_path / "new" / "scan.png", scanned)
    img = imread(out)
    assert abs(img.shape[1] - FIGSIZE[0] * DPI) <= 2 and abs(img.shape[0] - FIGSIZE[1] * DPI) <= 2
    assert float(img[..., :3].std()) > 0
