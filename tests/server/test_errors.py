"""Bad input: every case is a 4xx in OpenAI's error schema with `param` naming the field at
fault; never a 5xx; and the server serves normally afterwards."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]
TOO_LONG = "hello " * 3000  # about 3000 tokens, over the 2048-token context


def comp(**kw):
    return {"prompt": "Hello", "max_tokens": 4, **kw}


def chat(**kw):
    return {"messages": MSG, "max_tokens": 4, **kw}


# (id, path, body, status, param); a body that is a str is sent as raw bytes
CASES = [
    # the body itself
    ("malformed-json", C, '{"prompt": "Hi",', 400, None),
    ("malformed-json-chat", CHAT, '{"messages": [}', 400, None),
    ("empty-body", C, "", 400, None),
    ("array-body", C, "[1, 2, 3]", 400, None),
    ("number-body", CHAT, "42", 400, None),
    ("string-body", CHAT, '"hello"', 400, None),
    ("null-body", C, "null", 400, None),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe"}', 400, None),
    # prompt
    ("missing-prompt", C, {"max_tokens": 4}, 400, "prompt"),
    ("empty-prompt", C, comp(prompt=""), 400, "prompt"),
    ("empty-prompt-list", C, comp(prompt=[]), 400, "prompt"),
    ("prompt-number", C, comp(prompt=5), 400, "prompt"),
    ("prompt-object", C, comp(prompt={"text": "hi"}), 400, "prompt"),
    ("prompt-mixed-list", C, comp(prompt=["hi", 5]), 400, "prompt"),
    ("prompt-empty-in-list", C, comp(prompt=["hi", ""]), 400, "prompt"),
    ("prompt-bool-ids", C, comp(prompt=[True, False]), 400, "prompt"),
    ("token-id-negative", C, comp(prompt=[1, -5, 3]), 400, "prompt"),
    ("token-id-over-vocab", C, comp(prompt=[1, 49152]), 400, "prompt"),
    ("token-id-huge", C, comp(prompt=[[1, 2], [10**12]]), 400, "prompt"),
    # messages
    ("missing-messages", CHAT, {"max_tokens": 4}, 400, "messages"),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-string", CHAT, chat(messages="hi"), 400, "messages"),
    ("message-not-object", CHAT, chat(messages=["hi"]), 400, "messages[0]"),
    ("message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    ("message-missing-role", CHAT, chat(messages=[{"content": "x"}]), 400, "messages[0].role"),
    ("message-content-number", CHAT, chat(messages=[{"role": "user", "content": 3}]), 400, "messages[0].content"),
    ("message-content-missing", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("message-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages[0].content"),
    # model
    ("unknown-model", C, comp(model="gpt-5"), 404, "model"),
    ("unknown-variant", CHAT, chat(model="smollm2-135m:int3"), 404, "model"),
    ("model-number", C, comp(model=7), 400, "model"),
    # lengths
    ("context-exceeded-max-tokens", C, comp(max_tokens=5000), 400, "max_tokens"),
    ("context-exceeded-prompt", C, comp(prompt=TOO_LONG), 400, "prompt"),
    ("context-exceeded-chat", CHAT, chat(max_tokens=4000), 400, "max_tokens"),
    ("context-exceeded-messages", CHAT, chat(messages=[{"role": "user", "content": TOO_LONG}]), 400, "messages"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", C, comp(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-string", C, comp(max_tokens="10"), 400, "max_tokens"),
    ("max-tokens-float", CHAT, chat(max_tokens=2.5), 400, "max_tokens"),
    ("max-completion-tokens-bool", CHAT, chat(max_completion_tokens=True), 400, "max_completion_tokens"),
    ("max-tokens-zero-no-echo", C, comp(max_tokens=0), 400, "max_tokens"),
    # sampling values
    ("temperature-negative", C, comp(temperature=-0.5), 400, "temperature"),
    ("temperature-high", CHAT, chat(temperature=2.5), 400, "temperature"),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top-p-zero", C, comp(top_p=0), 400, "top_p"),
    ("top-p-over-one", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top-k-negative", C, comp(top_k=-2), 400, "top_k"),
    ("min-p-over-one", CHAT, chat(min_p=1.2), 400, "min_p"),
    ("presence-penalty-high", C, comp(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-low", CHAT, chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("repetition-penalty-zero", C, comp(repetition_penalty=0), 400, "repetition_penalty"),
    ("n-zero", C, comp(n=0), 400, "n"),
    ("n-huge", CHAT, chat(n=1000), 400, "n"),
    ("best-of-unlike-n", C, comp(best_of=3), 400, "best_of"),
    ("seed-string", C, comp(seed="abc"), 400, "seed"),
    ("seed-huge", CHAT, chat(seed=2**70), 400, "seed"),
    ("ignore-eos-string", C, comp(ignore_eos="yes"), 400, "ignore_eos"),
    ("user-number", CHAT, chat(user=5), 400, "user"),
    # stop
    ("stop-too-many", C, comp(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-number", CHAT, chat(stop=5), 400, "stop"),
    ("stop-empty-string", C, comp(stop=[""]), 400, "stop"),
    ("stop-list-of-numbers", CHAT, chat(stop=[1, 2]), 400, "stop"),
    # logit bias
    ("logit-bias-list", C, comp(logit_bias=[1, 2]), 400, "logit_bias"),
    ("logit-bias-bad-key", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-out-of-range", C, comp(logit_bias={"10": 500}), 400, "logit_bias"),
    ("logit-bias-token-over-vocab", CHAT, chat(logit_bias={"99999": 1}), 400, "logit_bias"),
    # logprobs
    ("logprobs-too-many", C, comp(logprobs=50), 400, "logprobs"),
    ("logprobs-chat-int", CHAT, chat(logprobs=5), 400, "logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    # streaming options and unsupported features
    ("stream-string", C, comp(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream-options-without-stream-completions", C, comp(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream-options-stream-false", C, comp(stream=False, stream_options={"include_usage": False}), 400, "stream_options"),
    ("stream-options-stream-false-chat", CHAT, chat(stream=False, stream_options={}), 400, "stream_options"),
    ("stream-options-bad-usage", C, comp(stream=True, stream_options={"include_usage": "y"}), 400, "stream_options"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response-format-json-schema", CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format"),
    ("suffix", C, comp(suffix="end"), 400, "suffix"),
    ("score-only-streamed", C, comp(max_tokens=0, echo=True, stream=True), 400, "max_tokens"),
]

# The same JSON cases again with stream: true: a bad request fails before any stream starts.
STREAMED = [(f"{cid}+stream", path, {**body, "stream": True}, status, param)
            for cid, path, body, status, param in CASES
            if isinstance(body, dict) and "stream" not in body and "stream_options" not in body]


def _send(live, path, body):
    if isinstance(body, dict):
        return live.http.post(path, json=body)
    return live.http.post(path, content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(("cid", "path", "body", "status", "param"), CASES + STREAMED,
                         ids=[c[0] for c in CASES + STREAMED])
def test_bad_input_is_a_4xx_in_openai_schema(live, cid, path, body, status, param):
    r = _send(live, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")  # never a started stream
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    if cid.startswith("context-exceeded"):
        assert err["code"] == "context_length_exceeded"


def test_the_matrix_is_wide():
    assert len({c[0] for c in CASES}) >= 40 and {c[1] for c in CASES} == {C, CHAT}


def test_other_bad_requests(live):
    big = json.dumps({"prompt": "x" * (9 * 2**20)})  # over the 8 MiB default
    r = live.http.post(C, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = live.http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = live.http.get(C)
    assert r.status_code == 405 and "error" in r.json()
    r = live.http.post("/detokenize", json={"tokens": [1, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = live.http.post("/tokenize", json={"text": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_stream_options_null_is_no_options(live):
    """Only stream_options that are there are refused without stream: true; null is absent."""
    for path, body in ((C, comp(max_tokens=2)), (CHAT, chat(max_tokens=2))):
        r = live.http.post(path, json={**body, "stream_options": None})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
        r = live.http.post(path, json={**body, "stream": True, "stream_options": None})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        assert '"usage"' not in r.text  # no options: no usage chunk


def test_still_serves_after_the_matrix(live):
    for path, body in ((C, comp(max_tokens=3)), (CHAT, chat(max_tokens=3)),
                       (C, comp(max_tokens=3, stream=True))):
        r = _send(live, path, body)
        assert r.status_code == 200, r.text
    assert live.http.get("/health").status_code == 200
    statuses = {k: v for k, v in _http_statuses(live).items() if k.startswith("5")}
    assert not statuses, f"5xx answered: {statuses}"


def _http_statuses(live) -> dict[str, float]:
    import re

    out: dict[str, float] = {}
    for line in live.http.get("/metrics").text.splitlines():
        if m := re.match(r'nibble_http_requests_total\{.*status="(\d+)"\} (\S+)', line):
            out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2))
    return out
