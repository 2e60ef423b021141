"""OpenAI-style load for any OpenAI-compatible server (nibble, vLLM, llama.cpp's server, TGI).

Each user sends streaming requests back to back, chat or completions, with a prompt drawn from a
built-in set of the chosen length and a fixed output length (max_tokens with ignore_eos, which
nibble and vLLM honour), and records per request, as locust entries:

  POST <endpoint>   the whole request, sent to [DONE]; its "content size" is the number of
                    generated tokens (the usage chunk)
  TTFT <endpoint>   time to the first chunk that carries text
  ITL <endpoint>    inter-token latency per request: (last text chunk - first) / (tokens - 1),
                    so a chunk that carries several tokens counts as several gaps

A request fails when the status is not 200, an error event arrives, the stream ends without
[DONE], or the usage says a different number of tokens than max_tokens (unless
--nibble-allow-short). 429s are failures named "429", so overload shows as refusals.

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --nibble-api chat --nibble-prompts medium --nibble-max-tokens 64
"""

from __future__ import annotations

import itertools
import json
import time

from locust import HttpUser, events, task
from locust.exception import StopUser

# Built in, no download: short (a line), medium (a paragraph), long (several paragraphs).
_PARAGRAPH = ("A hash table stores key-value pairs in an array of buckets. A hash function maps "
              "each key to a bucket index, so that lookups, inserts and deletes take constant time "
              "on average. When two keys land in the same bucket, the table resolves the "
              "collision by chaining entries in a list or by probing for another free slot. ")
PROMPTS = {
    "short": ["What is the capital of France?", "Name three primary colors.",
              "Write a haiku about autumn.", "What does CPU stand for?"],
    "medium": [f"{_PARAGRAPH}\nExplain the idea above in your own words.",
               f"{_PARAGRAPH}\nWhat are the trade-offs of chaining versus probing?",
               f"{_PARAGRAPH}\nGive an example of a good hash function and say why."],
    "long": [f"{_PARAGRAPH * 6}\nSummarize the text above in three sentences.",
             f"{_PARAGRAPH * 6}\nWrite five quiz questions about the text above."],
}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--nibble-api", choices=["chat", "completions", "mixed"], default="chat",
                        help="which endpoint the users call (mixed: alternate)")
    parser.add_argument("--nibble-prompts", choices=[*PROMPTS, "mixed"], default="short",
                        help="prompt length set")
    parser.add_argument("--nibble-max-tokens", type=int, default=64,
                        help="fixed output length (max_tokens with ignore_eos)")
    parser.add_argument("--nibble-model", default="", help="model name sent (default: the server's first)")
    parser.add_argument("--nibble-api-key", default="", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--nibble-allow-short", action="store_true",
                        help="do not fail requests that return fewer tokens than asked")


class OpenAIUser(HttpUser):
    """Streams one request after another (no think time: the profiles set the load)."""

    def on_start(self) -> None:
        o = self.environment.parsed_options
        if o.nibble_max_tokens < 1:
            raise StopUser()
        sets = list(PROMPTS) if o.nibble_prompts == "mixed" else [o.nibble_prompts]
        self.prompts = itertools.cycle([p for s in sets for p in PROMPTS[s]])
        self.apis = itertools.cycle(["chat", "completions"] if o.nibble_api == "mixed" else [o.nibble_api])
        self.headers = {"Authorization": f"Bearer {o.nibble_api_key}"} if o.nibble_api_key else {}

    @task
    def stream(self) -> None:
        o = self.environment.parsed_options
        api, prompt = next(self.apis), next(self.prompts)
        body = {"max_tokens": o.nibble_max_tokens, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if o.nibble_model:
            body["model"] = o.nibble_model
        if api == "chat":
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        else:
            path, body["prompt"] = "/v1/completions", prompt
        self._run(path, body, o.nibble_max_tokens, o.nibble_allow_short)

    def _run(self, path: str, body: dict, max_tokens: int, allow_short: bool) -> None:
        start = time.perf_counter()
        first = last = None
        tokens, done, error = None, False, None
        with self.client.post(path, json=body, headers=self.headers, stream=True,
                              catch_response=True, name=f"POST {path}") as resp:
            if resp.status_code != 200:
                resp.failure(str(resp.status_code))
                return
            for raw in resp.iter_lines():
                line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"].get("message", "error event")
                    continue
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens")
                if any(_text(c) for c in event.get("choices", [])):
                    last = time.perf_counter()
                    first = first or last
            if error or not done:
                resp.failure(error or "the stream ended without [DONE]")
                return
            if tokens is None or (tokens != max_tokens and not allow_short):
                resp.failure(f"asked for {max_tokens} tokens, usage says {tokens}")
                return
            # locust timed the response headers only (the body streams): report the whole request
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = tokens
            resp.success()
        fire = self.environment.events.request.fire
        if first is not None:
            fire(request_type="TTFT", name=path, response_time=(first - start) * 1000,
                 response_length=0, exception=None, context={})
        if first is not None and tokens > 1:
            fire(request_type="ITL", name=path, response_time=1000 * (last - first) / (tokens - 1),
                 response_length=0, exception=None, context={})


def _text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""
