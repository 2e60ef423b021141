"""A/B comparison on the default model: A against A is an identity, int8 costs less than int4-g128,
the report's JSON schema, the PNG, and `nibble compare` end to end."""

from __future__ import annotations

import json

import pytest

from engine.eval import CompareOptions, compare, stats
from engine.eval.plot import write_png
from engine.eval.texts import corpus_chunks, corpus_text

pytestmark = pytest.mark.slow

SMALL = CompareOptions(ctx=64, chunks=2, max_prompts=2, max_tokens=8, speed_tokens=2, speed_rounds=1)
CI = ("value", "ci95")


def _check_schema(report: dict) -> None:
    assert report["schema"] == "nibble.compare/1"
    for side in ("a", "b"):
        assert set(report[side]) >= {"label", "model", "policy", "weight_bytes", "kernels",
                                     "cpu_dispatch"}
        assert report[side]["weight_bytes"] > 0
    t = report["teacher_forced"]
    assert t["scored_tokens"] == t["chunks"] * (t["ctx"] // 2)
    for key in ("ppl_ratio", "top1_agreement", "rms_dp"):
        assert set(t[key]) == set(CI)
        lo, hi = t[key]["ci95"]
        assert lo <= t[key]["value"] + 1e-9 and t[key]["value"] <= hi + 1e-9
    assert set(t["kld"]) == {"mean", "ci95", "median", "p90", "p99", "max"}
    assert 0 <= t["kld"]["median"] <= t["kld"]["p90"] <= t["kld"]["p99"] <= t["kld"]["max"]
    f = report["free_running"]
    assert set(f) >= {"prompts", "max_tokens", "exact_match_rate", "token_agreement",
                      "median_first_divergence", "first_divergence", "survival"}
    assert len(f["first_divergence"]) == f["prompts"]
    c = report["cost"]
    assert c["a_decode_tok_s"] > 0 and c["b_decode_tok_s"] > 0 and c["a_weight_bytes"] > 0
    assert {"cpu", "torch"} <= set(report["machine"])
    json.dumps(report)  # serializable as it stands


def test_a_against_a_is_an_identity(llm_factory, tmp_path):
    llm = llm_factory("int4")
    result = compare(llm, llm, "int4", "int4", SMALL, progress=False)
    r = result.report
    _check_schema(r)
    t, f = r["teacher_forced"], r["free_running"]
    assert t["kld"]["mean"] == 0 and t["kld"]["max"] == 0 and t["kld"]["ci95"] == [0, 0]
    assert t["top1_agreement"]["value"] == 1.0 and t["rms_dp"]["value"] == 0
    assert t["ppl_ratio"]["value"] == 1.0 and t["ppl_a"] == t["ppl_b"]
    assert f["exact_match_rate"] == 1.0 and f["token_agreement"] == 1.0
    assert f["median_first_divergence"] is None and f["first_divergence"] == [None] * 2
    assert r["cost"]["weight_ratio_b_over_a"] == 1.0
    png = write_png(tmp_path / "aa.png", result.plot)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_int8_costs_less_than_int4_g128(llm_factory):
    """Teacher-forced on 2 chunks of 256 tokens of the built-in corpus against bf16 (scored once,
    shared by both sides: bf16 matmuls are the slow part on CPUs without bf16 units)."""
    ref = llm_factory("bf16")
    chunks = corpus_chunks(ref.tokenizer, corpus_text("builtin")[0], 256, 2)
    ref_logits = {tuple(c): ref.score(c) for c in chunks}
    reports = {}
    for q in ("int8", "int4"):
        llm = llm_factory(q)
        per_chunk = [stats.score_chunk(lambda ids: ref_logits[tuple(ids)], llm.score, c) for c in chunks]
        reports[q] = stats.summarize(per_chunk)
    t8, t4 = reports["int8"], reports["int4"]
    print({q: r["kld"]["mean"] for q, r in reports.items()})
    assert 0 < t8["kld"]["mean"] < t4["kld"]["mean"]
    # Limits measured on this text (int8 0.0044, int4-g128 0.46, whose "original" weights are
    # Q4_1 blocks of 32 that a 128-grid cannot hold) with 50-100% headroom; int4 with its
    # nibble order swapped measured 17.6.
    assert t8["kld"]["mean"] < 0.01 and t4["kld"]["mean"] < 0.7
    assert t8["top1_agreement"]["value"] > t4["top1_agreement"]["value"]
    assert t4["ppl_ratio"]["ci95"][0] > 1.0  # int4-g128 is measurably worse, paired


def test_compare_command_writes_report_and_png(tmp_path, capsys):
    from server.cli import main

    out = tmp_path / "report"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"prompt": "1, 2, 3,"}\n')
    code = main(["compare", "--a", "int8", "--b", "int4", "--ctx", "32", "--chunks", "2",
                 "--prompts", str(prompts), "--max-tokens", "4", "--no-cost", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "int4 (B) against int8 (A)" in printed.out and "KLD(A||B)" in printed.out
    report = json.loads((out / "report.json").read_text())
    assert report["a"]["label"] == "int8" and report["b"]["label"] == "int4"
    assert report["teacher_forced"]["kld"]["mean"] > 0
    assert report["free_running"]["prompts"] == 2 and report["cost"] is None
    # which kernels computed each side's numbers
    assert {g["format"] for g in report["a"]["kernels"]["layers"]} >= {"int8"}
    assert {g["format"] for g in report["b"]["kernels"]["layers"]} >= {"int4"}
    assert f"kernels: A {report['a']['kernels']['decode_step']}" in printed.out
    assert isinstance(report["b"]["cpu_dispatch"], list)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_help_explains_the_metrics(capsys):
    from server.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for fragment in ("KL(A||B)", "95% bootstrap", "top-1 agreement", "survival curve",
                     "report.png", "MODEL:QUANT", "--corpus", "--prompts"):
        assert fragment in out, fragment


@pytest.mark.parametrize("argv, fragment", [
    (["--b", "int5"], "int5"),
    (["--b", "no-such-model:int4"], "no-such-model"),
    (["--chunks", "1"], "--chunks must be at least 2"),
    (["--corpus", "/nonexistent/corpus.txt"], "cannot read the corpus"),
])
def test_compare_command_mistakes(argv, fragment, tmp_path, capsys):
    from server.cli import main

    code = main(["compare", "--out", str(tmp_path / "x"), "--no-cost", "--no-free-running", *argv])
    assert code == 2
    assert fragment in capsys.readouterr().err
