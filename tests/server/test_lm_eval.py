"""EleutherAI's lm-evaluation-harness (the dev extra pins 0.4.13) against a live server, run as
its users run it: `local-completions` given nothing but the server's URL. It has to find the
tokenizer through /tokenizer_info (no model hub), and its loglikelihoods have to be the ones the
server gives for the same tokens."""

from __future__ import annotations

import json
import math
import re

import pytest

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}]

CAPITALS = [("France", ["Paris", "Rome", "Lima"], 0), ("Japan", ["Oslo", "Tokyo", "Cairo"], 1),
            ("Italy", ["Madrid", "Bern", "Rome"], 2), ("Egypt", ["Cairo", "Quito", "Riga"], 0),
            ("Peru", ["Dublin", "Lima", "Hanoi"], 1)]
NOTES = [
    "The river rises in the hills north of the town and reaches the sea after a slow, winding "
    "course through farmland. In spring the water is high and brown with silt; by late summer "
    "it runs clear and shallow enough to wade across at the old ford below the mill. The mill "
    "itself stopped working a century ago, but its wheel still turns when the current is strong.",
    "To make bread, mix flour, water, salt and yeast, knead the dough until it is smooth, and "
    "let it rise in a warm place for an hour.",
    "Cats sleep most of the day.",
]
# lm-eval's own context window (model_args max_length): small, so that the longest note is
# scored in several windows
MAX_LENGTH = 32

TASKS = """\
task: nibble_capitals
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{dir}/capitals.jsonl"}}, cache_dir: "{dir}/hf-cache"}}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
---
task: nibble_notes
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{dir}/notes.jsonl"}}, cache_dir: "{dir}/hf-cache"}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""


def _write_tasks(d) -> None:
    with open(d / "capitals.jsonl", "w") as f:
        for country, choices, answer in CAPITALS:
            f.write(json.dumps({"country": country, "choices": choices, "answer": answer}) + "\n")
    with open(d / "notes.jsonl", "w") as f:
        for text in NOTES:
            f.write(json.dumps({"text": text}) + "\n")
    for i, doc in enumerate(TASKS.format(dir=d).split("---\n")):
        (d / f"task{i}.yaml").write_text(doc)


def _prompt_logprobs(live, prompts: list[list[int]]) -> list[list[float]]:
    """The server's teacher-forced logprob of each prompt's tokens after the first (one
    request; the test server is batch-invariant, so batching changes nothing)."""
    r = live.http.post("/v1/completions", json={"prompt": prompts, "max_tokens": 0,
                                                "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    out = []
    for ids, choice in zip(prompts, r.json()["choices"], strict=True):
        lps = choice["logprobs"]["token_logprobs"]
        assert lps[0] is None and len(lps) == len(ids)
        out.append(lps[1:])
    return out


def _answered(live, endpoint: str) -> float:
    """How many 200s the endpoint has given (0 before its first)."""
    try:
        return live.metric("nibble_http_requests_total", endpoint=endpoint, status="200")
    except AssertionError:
        return 0.0


def test_lm_eval_remote_tokenizer_is_the_servers(live, llm):
    """lm-eval's RemoteTokenizer, built from the URL alone, encodes, decodes and renders the
    chat template as the server does."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = live.url + "/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote, tok = RemoteTokenizer(url), llm.tokenizer
    assert (remote.eos_token_id, remote.bos_token_id) == (tok.eos_token_id, tok.bos_token_id)
    text = "Héllo wörld, 1 2 3"
    assert remote.encode(text) == tok.encode(text, add_special_tokens=False)
    assert remote.decode(remote.encode(text)) == text
    rendered = remote.apply_chat_template(CHAT)  # lm-eval's own Jinja over the served template
    served = live.http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert tok.encode(rendered, add_special_tokens=False) == served


def test_lm_eval_scores_a_local_task_through_the_server(live, llm, tmp_path, monkeypatch):
    """A multiple-choice task and a rolling-perplexity task from local JSONL files. lm-eval
    picks the remote tokenizer by itself, and its numbers are recomputed here from the
    server's echo logprobs: each choice's loglikelihood, the accuracy, and the perplexities
    over its windows (the document after one prefix token; each window scores the next
    max_length - 2 tokens given what precedes them within max_length - 1 tokens)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    def no_hub(*args, **kwargs):
        raise AssertionError(f"lm-eval looked for a Hugging Face tokenizer: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)

    _write_tasks(tmp_path)
    before = {ep: _answered(live, ep) for ep in ("/tokenizer_info", "/tokenize", "/v1/completions")}
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={live.url}/v1/completions,model=smollm2-135m,"
                   f"tokenizer_backend=auto,max_length={MAX_LENGTH},max_retries=1,timeout=60",
        tasks=["nibble_capitals", "nibble_notes"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0, log_samples=True)
    # it asked the server for the tokenizer (nothing else could have given it one offline)
    for ep, n in before.items():
        assert _answered(live, ep) > n, ep
    tok = llm.tokenizer

    # multiple choice: each choice's loglikelihood, and the accuracy they give
    samples = out["samples"]["nibble_capitals"]
    assert sorted(s["doc"]["country"] for s in samples) == sorted(c[0] for c in CAPITALS)
    prompts, starts = [], []
    for s in samples:
        context = f"Q: What is the capital of {s['doc']['country']}?\nA:"
        for choice in s["doc"]["choices"]:
            prompts.append(tok.encode(f"{context} {choice}", add_special_tokens=False))
            starts.append(len(tok.encode(context, add_special_tokens=False)) - 1)
    lls = iter(sum(lp[i:]) for lp, i in zip(_prompt_logprobs(live, prompts), starts, strict=True))
    correct = 0
    for s in samples:
        mine = [next(lls) for _ in s["doc"]["choices"]]
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(mine, abs=1e-4)
        correct += max(range(len(mine)), key=mine.__getitem__) == s["doc"]["answer"]
    results = out["results"]
    assert results["nibble_capitals"]["acc,none"] == correct / len(CAPITALS)

    # rolling perplexity: the prefix token lm-eval puts in front is BOS (else EOS)
    prefix = tok.bos_token_id if tok.bos_token_id else tok.eos_token_id
    window = MAX_LENGTH - 2  # tokens scored per window
    spans, scored = [], []
    for text in NOTES:
        seq = [prefix] + tok.encode(text, add_special_tokens=False)
        for start in range(1, len(seq), window):
            end = min(start + window, len(seq))
            spans.append(seq[max(0, end - window - 1):end])  # as much context as fits
            scored.append(end - start)
    assert len(spans) > len(NOTES)  # the first note took several windows
    total_ll = sum(sum(lp[-n:]) for lp, n in zip(_prompt_logprobs(live, spans), scored, strict=True))
    words = sum(len(re.split(r"\s+", text)) for text in NOTES)
    nbytes = sum(len(text.encode()) for text in NOTES)
    notes = results["nibble_notes"]
    assert math.isfinite(notes["word_perplexity,none"]) and notes["word_perplexity,none"] > 1
    assert notes["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-6)
    assert notes["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / nbytes), rel=1e-6)
