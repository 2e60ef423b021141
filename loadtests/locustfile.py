"""OpenAI-style load for any OpenAI-compatible server (nibble, vLLM, llama.cpp's server, TGI).

Users send streaming requests, chat or completions, with a prompt drawn from a built-in set of
the chosen length and a fixed output length (max_tokens with ignore_eos, which nibble and vLLM
honour). Two kinds of load:

  closed loop (default)  each of the -u users sends its next request when the last one ends
  open loop (--nibble-rate R)  requests arrive as a Poisson process of R per second whatever
                         the server's pace, split over the users (one user is enough): the way
                         traffic from many independent clients arrives. With --nibble-send-for
                         the count is fixed at R x the window (the arrival times stay random)

Per request, as locust entries:

  POST <endpoint>   the whole request, sent to [DONE]; its "content size" is the number of
                    generated tokens (the usage chunk)
  TTFT <endpoint>   time to the first chunk that carries text
  ITL <endpoint>    inter-token latency per request: (last text chunk - first) / (tokens - 1),
                    so a chunk that carries several tokens counts as several gaps

A request fails when the status is not 200, an error event arrives, the stream ends without
[DONE], or the usage says a different number of tokens than max_tokens (unless
--nibble-allow-short). 429s are failures named "429", so overload shows as refusals.

--nibble-record FILE also writes one JSON line per request (start and end times, status, TTFT,
the gaps between text chunks, tokens, error), which `nibble bench serve` turns into its report.
--nibble-send-for S stops sending after S seconds, lets the requests in flight finish (at most
--nibble-drain seconds), then ends the run, so the last requests are not cut off.

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --nibble-api chat --nibble-prompts medium --nibble-max-tokens 64
    locust -f loadtests/locustfile.py --headless -u 1 -t 90s --host http://127.0.0.1:8000 \\
        --nibble-rate 2 --nibble-send-for 60 --nibble-record run.jsonl
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import deque

import gevent
import locust.stats
from locust import HttpUser, events, task
from locust.exception import StopUser
from requests.adapters import HTTPAdapter

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
    parser.add_argument("--nibble-rate", type=float, default=0.0,
                        help="open loop: Poisson arrivals at this many requests per second in all "
                        "(0: closed loop, each user waits for its last request)")
    parser.add_argument("--nibble-max-inflight", type=int, default=1024,
                        help="open loop: arrivals beyond this many requests in flight are "
                        "recorded as client_saturated instead of sent")
    parser.add_argument("--nibble-seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--nibble-send-for", type=float, default=0.0,
                        help="stop sending after this many seconds, let the requests in flight "
                        "finish, then end the run (0: run until -t)")
    parser.add_argument("--nibble-drain", type=float, default=120.0,
                        help="seconds the requests in flight get after --nibble-send-for")
    parser.add_argument("--nibble-record", default="", help="append one JSON line per request here")


class _Run:
    """State shared by every user of this locust process."""
    inflight = 0
    sending = True
    t0 = 0.0  # time.monotonic() at the start of the run
    users = itertools.count()
    record = None


@events.test_start.add_listener
def _start(environment, **_kw) -> None:
    o = environment.parsed_options
    _Run.t0 = time.monotonic()
    if o.nibble_record:
        _Run.record = open(o.nibble_record, "a", buffering=1)  # noqa: SIM115 (closed on quit)
    if o.nibble_send_for > 0:
        gevent.spawn(_stop_after, environment, o.nibble_send_for, o.nibble_drain)


def _stop_after(environment, send_for: float, drain: float) -> None:
    gevent.sleep(send_for)
    _Run.sending = False
    deadline = time.monotonic() + drain
    while _Run.inflight and time.monotonic() < deadline:
        gevent.sleep(0.05)
    if environment.parsed_options.csv_prefix:
        # --csv files are rewritten every CSV_STATS_INTERVAL_SEC, not on quit: let the writer
        # take the last requests in
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.5)
    environment.runner.quit()


@events.quitting.add_listener
def _close(**_kw) -> None:
    if _Run.record is not None:
        _Run.record.close()
        _Run.record = None


def _write(entry: dict) -> None:
    if _Run.record is not None:
        _Run.record.write(json.dumps(entry) + "\n")


class OpenAIUser(HttpUser):
    """Streams requests: one after another (closed loop, no think time: the profiles set the
    load) or at Poisson arrival times (open loop)."""

    def on_start(self) -> None:
        o = self.environment.parsed_options
        if o.nibble_max_tokens < 1:
            raise StopUser()
        sets = list(PROMPTS) if o.nibble_prompts == "mixed" else [o.nibble_prompts]
        self.prompts = itertools.cycle([p for s in sets for p in PROMPTS[s]])
        self.apis = itertools.cycle(["chat", "completions"] if o.nibble_api == "mixed" else [o.nibble_api])
        self.headers = {"Authorization": f"Bearer {o.nibble_api_key}"} if o.nibble_api_key else {}
        # open loop keeps many streams open on this one session
        self.client.mount("http://", HTTPAdapter(pool_maxsize=max(10, o.nibble_max_inflight)))
        self.client.mount("https://", HTTPAdapter(pool_maxsize=max(10, o.nibble_max_inflight)))
        users = max(1, getattr(o, "num_users", None) or 1)
        # the same seed gives every target the same arrival times
        self.rng = random.Random(f"{o.nibble_seed}/{next(_Run.users)}")
        self.rate = o.nibble_rate / users
        # With a sending window, exactly rate x window arrivals at uniform random times: a
        # Poisson process given its count, so a short stage offers the load it names (a free
        # Poisson count over 30 s is off by +-20% at 1 req/s) and keeps the bursts.
        self.schedule = None
        if self.rate > 0 and o.nibble_send_for > 0:
            window = o.nibble_send_for
            self.schedule = deque(sorted(self.rng.uniform(0, window)
                                         for _ in range(round(self.rate * window))))

    @task
    def stream(self) -> None:
        if not _Run.sending:
            gevent.sleep(0.05)
            return
        if self.rate <= 0:
            self._request()
            return
        if self.schedule is None:
            gevent.sleep(self.rng.expovariate(self.rate))
        elif self.schedule:
            gevent.sleep(max(0.0, _Run.t0 + self.schedule.popleft() - time.monotonic()))
        else:  # every arrival sent: wait for the end of the window
            gevent.sleep(0.05)
            return
        if not _Run.sending:
            return
        if _Run.inflight >= self.environment.parsed_options.nibble_max_inflight:
            now = time.time()
            _write({"start": now, "end": now, "status": 0, "ok": False, "error": "client_saturated"})
            return
        gevent.spawn(self._request)

    def _request(self) -> None:
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
        _Run.inflight += 1
        entry = {"api": api, "start": time.time(), "status": 0, "ok": False}
        try:
            self._run(path, body, o.nibble_max_tokens, o.nibble_allow_short, entry)
        finally:
            _Run.inflight -= 1
            entry["end"] = time.time()
            _write(entry)

    def _run(self, path: str, body: dict, max_tokens: int, allow_short: bool, entry: dict) -> None:
        start = time.perf_counter()
        chunks: list[float] = []  # arrival of each chunk that carries text
        tokens, done, error = None, False, None
        with self.client.post(path, json=body, headers=self.headers, stream=True,
                              catch_response=True, name=f"POST {path}") as resp:
            entry["status"] = resp.status_code
            if resp.status_code != 200:
                entry["error"] = str(resp.status_code)
                resp.failure(entry["error"])
                return
            try:
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
                        chunks.append(time.perf_counter())
            except Exception as exc:  # the connection broke mid-stream
                error = f"{type(exc).__name__}: {exc}"
            entry["tokens"], entry["chunks"] = tokens, len(chunks)
            if chunks:
                entry["ttft"] = chunks[0] - start
                entry["gaps"] = [round(b - a, 6) for a, b in itertools.pairwise(chunks)]
            if not error and not done:
                error = "the stream ended without [DONE]"
            if not error and (tokens is None or (tokens != max_tokens and not allow_short)):
                error = f"asked for {max_tokens} tokens, usage says {tokens}"
            if error:
                entry["error"] = error
                resp.failure(error)
                return
            entry["ok"] = True
            # locust timed the response headers only (the body streams): report the whole request
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = tokens
            resp.success()
        if not chunks:  # every token decoded to an empty string: nothing to time
            return
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name=path, response_time=entry["ttft"] * 1000,
             response_length=0, exception=None, context={})
        if tokens > 1:
            fire(request_type="ITL", name=path,
                 response_time=1000 * (chunks[-1] - chunks[0]) / (tokens - 1),
                 response_length=0, exception=None, context={})


def _text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""
