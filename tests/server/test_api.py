"""The official openai client against a live server: chat and completions, streaming and
not, n > 1, logprobs, echo, stop, usage; /tokenize, /detokenize, /tokenizer_info,
/v1/models, /health."""

from __future__ import annotations

import math
from urllib.parse import quote

import pytest
import torch

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_variant_with_quantization_and_bytes(client, llm):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m:int4"]
    card = models[0].model_dump()
    assert card["quantization"] == "int4" and card["max_model_len"] == 2048
    from engine.report import module_weights

    assert card["weight_bytes"] == sum(r.nbytes for r in module_weights(llm.model)) > 50e6
    assert client.models.retrieve("smollm2-135m:int4").id == "smollm2-135m:int4"
    # which kernels serve it: every linear layer in one of the groups, each group with the
    # path a decode step and a prefill chunk take, and the process's CPU dispatch choices
    kernels = card["kernels"]
    assert sum(g["count"] for g in kernels["layers"]) == len(llm.model.quant_linears())
    assert {g["modules"] for g in kernels["layers"]} >= {"layers.*.mlp.down_proj", "lm_head"}
    assert all(g["rows_1"] and g["rows_512"] for g in kernels["layers"])
    assert kernels["decode_step"] and isinstance(kernels["cpu_dispatch"], list)


def test_health_is_ok_when_ready(live):
    r = live.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_streamed_equals_chat_whole(client):
    whole = client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=24,
                                           temperature=0)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert whole.object == "chat.completion" and whole.model == "smollm2-135m:int4"
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_is_the_template_applied_to_the_messages(client, live):
    """The chat endpoint's greedy answer is the completion of the templated prompt."""
    ids = live.http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    chat = client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=16,
                                          temperature=0)
    comp = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=16, temperature=0)
    assert comp.choices[0].text == chat.choices[0].message.content
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens == len(ids)


def test_completions_streamed_by_index_with_n_2(client):
    kw = dict(model="smollm2-135m", prompt=["Once upon a time", "The best thing about"],
              max_tokens=12, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert whole.usage.completion_tokens == 4 * 12
    texts = {c.index: c.text for c in whole.choices}
    assert texts[0] != texts[1], "two completions of one prompt drew the same tokens"
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == texts


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the top one
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode() == t.token
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1 + 1e-4


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_the_prompt(client, live, llm, max_tokens):
    """lm-eval's loglikelihood requests: echo with logprobs gives each prompt token's
    teacher-forced logprob (the first has none)."""
    prompt = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=max_tokens,
                                  echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    ids = llm.tokenizer.encode(prompt)
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + max_tokens
    assert "".join(lp.tokens[:len(ids)]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert r.usage.completion_tokens == max_tokens
    expected = torch.log_softmax(llm.score(ids), -1)  # the server is idle: its engine is free
    want = [expected[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=2e-3)


def test_stop_and_max_completion_tokens(client):
    base = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0)
    text = base.choices[0].text
    stop = text[4:7]
    cut = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=12,
                                    temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smollm2-135m", messages=CHAT, temperature=0,
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_tokenize_detokenize_round_trip(live, llm):
    text = "Héllo wörld, 1 2 3"
    tok = live.http.post("/tokenize", json={"prompt": text}).json()
    assert tok["tokens"] == llm.tokenizer.encode(text) and tok["count"] == len(tok["tokens"])
    assert live.http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == text


def test_tokenizer_info_describes_the_served_tokenizer(live, llm):
    """GET /tokenizer_info: what a client needs to tokenize and template as the server does."""
    tok = llm.tokenizer
    r = live.http.get("/tokenizer_info")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    info = r.json()
    assert info["model"] == "smollm2-135m:int4" and info["model_max_length"] == 2048
    assert info["vocab_size"] == len(tok) == 49152
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == tok.chat_template and "<|im_start|>" in info["chat_template"]
    assert (info["eos_token"], info["bos_token"]) == ("<|im_end|>", "<|im_start|>")
    for name in ("eos", "bos", "pad", "unk"):
        text, tid = info[f"{name}_token"], info[f"{name}_token_id"]
        assert (text, tid) == (getattr(tok, f"{name}_token"), getattr(tok, f"{name}_token_id"))
        # a client that only has the text finds the id through /tokenize, as lm-eval does
        r = live.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert r.json()["tokens"] == [tid]


def test_tokenizer_info_picks_the_variant_by_model(live):
    info = live.http.get("/tokenizer_info").json()
    for name in ("smollm2-135m", "smollm2-135m:int4", ""):
        assert live.http.get(f"/tokenizer_info?model={quote(name)}").json() == info
    r = live.http.get("/tokenizer_info?model=gpt-5")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_found"
    # the same body as any other endpoint's for that model
    assert r.json() == live.http.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"}).json()


def test_special_token_text_and_lone_surrogates_are_served(live):
    body = '{"messages": [{"role": "user", "content": "<|im_start|>hi \\ud800 there"}], "max_tokens": 3}'
    r = live.http.post("/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    r = live.http.post("/v1/completions", json={"prompt": "<|endoftext|>x", "max_tokens": 2,
                                                "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_api_key_guards_all_but_health_and_metrics(llm, live):
    from openai import AuthenticationError, OpenAI

    from tests.server.live import LiveServer, variant

    guarded = LiveServer([variant(llm, "int4")], api_key="s3cret")
    try:
        for path in ("/health", "/metrics"):
            assert guarded.http.get(path).status_code == 200
        r = guarded.http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = guarded.http.get("/v1/models", headers={"Authorization": "Bearer s3cre"})
        assert r.status_code == 401
        with OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0) as c, \
                pytest.raises(AuthenticationError):
            c.models.list()
        with OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0) as c:
            assert c.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=2).choices
    finally:
        guarded.stop()


def test_tokenization_runs_off_the_event_loop(client, live, llm, monkeypatch):
    """Tokenizing and templating a large prompt must not stall other connections."""
    import threading

    seen = []
    encode = llm.tokenizer.encode

    def spy(*args, **kwargs):
        seen.append(threading.current_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "encode", spy)
    client.completions.create(model="smollm2-135m", prompt="word " * 300, max_tokens=1)
    client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=1)
    assert len(seen) == 2
    assert all(t is not live.thread and t.name.startswith("nibble-tokenize") for t in seen)


def test_metrics_cover_latency_tokens_and_engine_state(client, live):
    labels = {"model": "smollm2-135m:int4", "quantization": "int4"}
    before = {name: live.metric(name, **labels) for name in (
        "nibble_prefix_cache_hit_tokens_total", "nibble_prompt_tokens_total",
        "nibble_generation_tokens_total", "nibble_time_to_first_token_seconds_count",
        "nibble_inter_token_latency_seconds_count", "nibble_e2e_request_latency_seconds_count")}
    prompt = "A shared system prompt that is long enough to fill a few KV blocks. " * 4
    for _ in range(2):
        client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    delta = {k: live.metric(k, **labels) - v for k, v in before.items()}
    assert delta["nibble_prefix_cache_hit_tokens_total"] >= 48  # the second reused >= 3 blocks
    assert delta["nibble_generation_tokens_total"] == 10
    assert delta["nibble_time_to_first_token_seconds_count"] == 2
    assert delta["nibble_inter_token_latency_seconds_count"] == 8
    assert delta["nibble_e2e_request_latency_seconds_count"] == 2
    assert delta["nibble_prompt_tokens_total"] > 2 * 48
    assert live.metric("nibble_requests_finished_total", finish_reason="length", **labels) >= 2
    assert live.metric("nibble_kv_blocks_total", **labels) > 0
    assert 0 <= live.metric("nibble_kv_cache_usage_ratio", **labels) <= 1
    for name in ("nibble_preemptions_total", "nibble_requests_running", "nibble_requests_waiting"):
        assert live.metric(name, **labels) >= 0
    assert live.metric("nibble_http_requests_total", endpoint="/v1/completions", status="200") >= 2
