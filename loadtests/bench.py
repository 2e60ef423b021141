"""`nibble bench serve`: load profiles run with locust (headless, in a subprocess) against nibble
servers this tool starts or against any OpenAI-compatible URL, with the report built from the
per-request records the locustfile writes.

Profiles:
  steady    a fixed number of closed-loop users, or a Poisson rate, for --duration seconds
  ramp      Poisson stages at rising rates (x --ramp-factor) until good/sent falls below the
            SLO's goodput_ratio, then --refine bisections between the last rate that held and
            the first that did not: the capacity is the highest rate that held
  overload  twice the capacity (--capacity, or a ramp first): the excess should be refused
            with 429, the accepted requests should still meet the SLO, and nothing may be a 5xx
  soak      a long steady run: host memory of the server over time and, once the server is
            idle again, KV-cache blocks that were not returned
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests import report
from loadtests.report import SLO

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCHEMA = "nibble.bench-serve/1"
PROFILES = ("steady", "ramp", "overload", "soak")
DEFAULT_DURATION = {"steady": 60.0, "ramp": 30.0, "overload": 60.0, "soak": 600.0}


@dataclass
class Workload:
    api: str = "chat"  # chat | completions | mixed
    prompts: str = "short"  # short | medium | long | mixed
    max_tokens: int = 64
    api_key: str = ""


@dataclass
class Options:
    profile: str = "steady"
    users: int = 0  # closed loop; 0 with rate 0 means 4 users
    rate: float = 0.0  # open loop, requests/s
    duration: float | None = None  # sending seconds per run (ramp: per stage)
    drain: float = 120.0
    ramp_start: float = 0.25
    ramp_factor: float = 1.5
    ramp_stages: int = 8
    refine: int = 1
    capacity: float | None = None
    seed: int = 0
    workload: Workload = field(default_factory=Workload)
    slo: SLO = field(default_factory=SLO)

    @property
    def seconds(self) -> float:
        return self.duration or DEFAULT_DURATION[self.profile]

    def check(self) -> None:
        """Every mistake here is found before any server starts."""
        if self.profile not in PROFILES:
            raise ValueError(f"profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        for name, value, ok in (
                ("--users", self.users, self.users >= 0),
                ("--rate", self.rate, self.rate >= 0),
                ("--duration", self.duration, self.duration is None or self.duration > 0),
                ("--drain", self.drain, self.drain >= 0),
                ("--ramp-start", self.ramp_start, self.ramp_start > 0),
                ("--ramp-factor", self.ramp_factor, self.ramp_factor > 1),
                ("--ramp-stages", self.ramp_stages, self.ramp_stages >= 1),
                ("--refine", self.refine, self.refine >= 0),
                ("--capacity", self.capacity, self.capacity is None or self.capacity > 0),
                ("--max-tokens", self.workload.max_tokens, self.workload.max_tokens >= 1)):
            if not ok:
                raise ValueError(f"{name} {value} is out of range")
        if self.users and self.rate:
            raise ValueError("give --users (closed loop) or --rate (open loop), not both")
        if self.profile in ("ramp", "overload") and (self.users or self.rate):
            raise ValueError(f"the {self.profile} profile sets its own rates; drop --users/--rate"
                             + (" (use --capacity)" if self.profile == "overload" else ""))


@dataclass
class Target:
    label: str
    url: str
    model: str = ""  # the name sent; found from /v1/models when empty
    started: list[str] | None = None  # the command, when this tool started the server


def check_locust() -> None:
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        raise RuntimeError("locust is not installed: pip install 'nibble[load]' (or locust>=2.20)")


# ---------------------------------------------------------------------------- HTTP and /metrics

def _get(url: str, api_key: str = "", timeout: float = 10.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def scrape(url: str, by: str | None = None) -> dict:
    """/metrics as {sample name: value summed over its label sets}; {} when the server has none.
    `by` a label (e.g. "replica"): {that label's value: {sample name: sum}} over the samples
    that carry it."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, text = _get(f"{url}/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if by is not None and by not in s.labels:
                    continue
                row = out if by is None else out.setdefault(s.labels[by], {})
                row[s.name] = row.get(s.name, 0.0) + s.value
    except ValueError:
        return {}
    return out


class MemoryWatch:
    """Samples the server's process_resident_memory_bytes from /metrics once a second."""

    def __init__(self, url: str, every: float = 1.0):
        self.url, self.every = url, every
        self.samples: list[tuple[float, float]] = []  # (unix time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memory")

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = scrape(self.url).get("process_resident_memory_bytes")
            if rss is not None:
                self.samples.append((time.time(), rss / 2**20))
            self._stop.wait(self.every)


def discover_model(target: Target, api_key: str) -> str:
    status, text = _get(f"{target.url}/v1/models", api_key)
    if status != 200:
        raise RuntimeError(f"{target.url}/v1/models answered {status}: {text[:200]}")
    models = [m["id"] for m in json.loads(text).get("data", [])]
    if not models:
        raise RuntimeError(f"{target.url} serves no model")
    return models[0]


def warm_up(target: Target, workload: Workload, requests: int = 2) -> None:
    """A couple of requests before measuring: first calls allocate and pick kernels."""
    body = json.dumps({"model": target.model, "prompt": "Warm up.", "max_tokens": workload.max_tokens,
                       "ignore_eos": True, "temperature": 0.0}).encode()
    headers = {"Content-Type": "application/json"}
    if workload.api_key:
        headers["Authorization"] = f"Bearer {workload.api_key}"
    for _ in range(requests):
        req = urllib.request.Request(f"{target.url}/v1/completions", body, headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"warm-up request to {target.url} failed with {exc.code}: "
                               f"{exc.read()[:300].decode('utf-8', 'replace')}") from None


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """The server's metrics once nothing runs or waits (nibble's gauges; others: at once)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        busy = m.get("nibble_requests_running", 0) + m.get("nibble_requests_waiting", 0)
        if not busy or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


# ---------------------------------------------------------------------------- nibble servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nibble_server(label: str, serve_args: list[str], log: Path, timeout: float = 900.0):
    """Starts `nibble serve SERVE_ARGS` on a free loopback port, yields its Target once /health
    is 200, and drains it with SIGTERM afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *serve_args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        target = Target(label, f"http://127.0.0.1:{port}",
                        started=["nibble", *cmd[3:]])
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"nibble serve {shlex.join(serve_args)} exited with "
                                       f"{proc.returncode}:\n{_tail(log)}")
                with contextlib.suppress(OSError):
                    if _get(f"{target.url}/health", timeout=2)[0] == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nibble serve was not ready in {timeout:.0f} s:\n{_tail(log)}")
                time.sleep(0.5)
            yield target
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM (a server drains and exits), then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- one locust run

def run_load(target: Target, opts: Options, out: Path, tag: str, *, users: int = 0,
             rate: float = 0.0) -> dict:
    """One headless locust run of `opts.seconds` of sending plus its drain; returns the stage
    with its summary, cross-check and memory samples (the raw records stay in out/tag.jsonl)."""
    w, seconds = opts.workload, opts.seconds
    tag = safe_name(tag)
    record = out / f"{tag}.jsonl"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", target.url, "-u", str(users or 1), "-r", str(users or 1),
           "-t", f"{int(seconds + opts.drain + 30)}s", "--stop-timeout", "5",
           "--exit-code-on-error", "0", "--loglevel", "WARNING",
           "--csv", str(out / tag),
           "--nibble-api", w.api, "--nibble-prompts", w.prompts,
           "--nibble-max-tokens", str(w.max_tokens), "--nibble-model", target.model,
           "--nibble-rate", str(rate), "--nibble-seed", str(opts.seed),
           "--nibble-send-for", str(seconds), "--nibble-drain", str(opts.drain),
           "--nibble-record", str(record)]
    if w.api_key:
        cmd += ["--nibble-api-key", w.api_key]
    before = wait_idle(target.url)
    with MemoryWatch(target.url) as memory:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not record.exists():
        raise RuntimeError(f"locust failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    after = wait_idle(target.url)
    records = report.read_records(record)
    return {"tag": tag, "users": users, "rate": rate, "seconds": seconds,
            "records_file": record.name, "records": records,
            "summary": report.summarize(records, opts.slo, seconds),
            "cross_check": report.cross_check(records, before, after, w.max_tokens),
            "memory": memory.samples, "metrics_before": before, "metrics_after": after}


# ---------------------------------------------------------------------------- profiles

def _holds(stage: dict, slo: SLO) -> bool:
    s = stage["summary"]
    return s["goodput"]["ratio"] >= slo.goodput_ratio and s["requests"]["server_errors_5xx"] == 0


def ramp(target: Target, opts: Options, out: Path, say) -> tuple[list[dict], float]:
    """Stages at rising rates until one misses the goodput ratio, then bisections between the
    last rate that held and the first that did not; returns the stages and the capacity (0.0
    when even the first rate missed)."""
    stages: list[dict] = []

    def holds(tag: str, rate: float) -> bool:
        stage = run_load(target, opts, out, f"{target.label}-{tag}", rate=rate)
        stages.append(stage)
        ok = _holds(stage, opts.slo)
        say(f"{target.label}: {tag} {rate:.3g} req/s -> goodput "
            f"{stage['summary']['goodput']['ratio']:.0%} ({'holds' if ok else 'below'} "
            f"{opts.slo.goodput_ratio:.0%})")
        return ok

    held, broke, rate = 0.0, None, opts.ramp_start
    for i in range(opts.ramp_stages):
        if not holds(f"ramp{i}", rate):
            broke = rate
            break
        held, rate = rate, rate * opts.ramp_factor
    for j in range(opts.refine if broke is not None else 0):
        rate = (held + broke) / 2 if held else broke / opts.ramp_factor
        held, broke = (rate, broke) if holds(f"refine{j}", rate) else (held, rate)
    return stages, held


def profile(target: Target, opts: Options, out: Path, say) -> dict:
    """Runs opts.profile against one target: its stages, the stage that is summarized (steady
    and soak: the run; ramp: the stage at capacity; overload: the overload run) and the
    profile's own findings."""
    result: dict = {"label": target.label, "url": target.url, "model": target.model,
                    "started": target.started, "notes": []}
    if opts.profile in ("steady", "soak"):
        users = opts.users or (0 if opts.rate else 4)
        say(f"{target.label}: {opts.profile}, {f'{users} users' if users else f'{opts.rate:g} req/s'}"
            f" for {opts.seconds:g} s")
        stages = [run_load(target, opts, out, f"{target.label}-{opts.profile}", users=users,
                           rate=opts.rate)]
        main = stages[0]
    elif opts.profile == "ramp":
        stages, capacity = ramp(target, opts, out, say)
        result["capacity_rps"] = capacity
        holding = [s for s in stages if s["rate"] == capacity]
        main = holding[0] if holding else stages[0]
        if not capacity:
            result["notes"].append(f"even {opts.ramp_start:g} req/s missed the SLO: lower --ramp-start")
    else:
        stages, capacity = [], opts.capacity
        if capacity is None:
            stages, capacity = ramp(target, opts, out, say)
            result["capacity_rps"] = capacity
            if not capacity:
                raise RuntimeError(f"{target.label}: no capacity found to overload "
                                   f"(even {opts.ramp_start:g} req/s missed the SLO)")
        say(f"{target.label}: overload at {2 * capacity:.3g} req/s (2x {capacity:.3g})")
        main = run_load(target, opts, out, f"{target.label}-overload", rate=2 * capacity)
        stages.append(main)
        result["overload"] = {"capacity_rps": capacity, "rate": 2 * capacity}
    summary = main["summary"]
    result["summary"] = summary
    result["cross_check"] = main["cross_check"]
    if not main["cross_check"]["agree"]:
        result["notes"] += main["cross_check"]["notes"]
    checks = dict(summary["slo"]["checks"])
    if opts.profile == "ramp":
        checks = {"capacity_found": bool(result["capacity_rps"])}
    if opts.profile == "overload":
        checks["no_5xx"] = summary["requests"]["server_errors_5xx"] == 0
        if not summary["requests"]["refused_429"]:
            result["notes"].append("no request was refused with 429: the server queued the excess")
    memory = [m for s in stages for m in s["memory"]]
    result["memory"] = {"peak_rss_mb": round(max(mb for _, mb in memory), 1) if memory else None}
    if opts.profile == "soak":
        result["soak"] = soak_findings(main, opts.slo)
        checks["kv_blocks_returned"] = result["soak"].get("kv_blocks_not_returned", 0) == 0
        if opts.slo.max_rss_growth_mb is not None and result["soak"]["rss_growth_mb"] is not None:
            checks["rss_growth"] = result["soak"]["rss_growth_mb"] <= opts.slo.max_rss_growth_mb
    result["checks"], result["pass"] = checks, all(checks.values())
    records = [r for s in stages for r in s["records"]]
    origin = min((r["start"] for r in records), default=0.0)
    span = max((r["end"] for r in records), default=origin) - origin
    result["series"] = report.series(records, origin, bucket=max(1.0, round(span / 40)))
    result["series"]["memory"] = [(round(t - origin, 2), round(mb, 1)) for t, mb in memory]
    result["stages"] = [{k: v for k, v in s.items() if k not in ("records", "memory", "metrics_before",
                                                                  "metrics_after")} for s in stages]
    return result


def soak_findings(stage: dict, slo: SLO) -> dict:
    """Host memory of the server over the soak: the growth over the whole run (median of the
    last tenth of the samples against the first tenth) and over its second half, with the
    second half's least-squares slope: a warming server grows at first and then stays flat,
    a leak keeps the slope. Then the KV blocks still taken once the server is idle."""
    samples = stage["memory"]
    out: dict = {"rss_growth_mb": None, "rss_growth_second_half_mb": None,
                 "rss_slope_second_half_mb_per_min": None}
    if len(samples) >= 8:
        def median(part):
            return report.percentile([mb for _, mb in part], 50)

        k, half = max(1, len(samples) // 10), samples[len(samples) // 2:]
        first, middle, last = median(samples[:k]), median(half[:k]), median(samples[-k:])
        t0 = half[0][0]
        xs, ys = [t - t0 for t, _ in half], [mb for _, mb in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        out.update(rss_start_mb=round(first, 1), rss_end_mb=round(last, 1),
                   rss_growth_mb=round(last - first, 1),
                   rss_growth_second_half_mb=round(last - middle, 1),
                   rss_slope_second_half_mb_per_min=round(slope * 60, 3))
    before, after = stage["metrics_before"], stage["metrics_after"]
    if "nibble_kv_blocks_free" in after:
        out["kv_blocks_total"] = after.get("nibble_kv_blocks_total")
        out["kv_blocks_free_before"] = before.get("nibble_kv_blocks_free")
        out["kv_blocks_free_after"] = after["nibble_kv_blocks_free"]
        out["kv_blocks_not_returned"] = before.get("nibble_kv_blocks_free", 0) - after["nibble_kv_blocks_free"]
    elif "vllm:kv_cache_usage_perc" in after:
        out["kv_cache_usage_after"] = after["vllm:kv_cache_usage_perc"]
    else:
        out["note"] = "the server exposes no KV-cache gauge this tool knows"
    return out


# ---------------------------------------------------------------------------- the whole run

def run(targets: list, opts: Options, out: Path, say=print) -> dict:
    """`targets`: Target objects, or (label, serve args) pairs for nibble servers to start one
    after another. Returns the report (also written to out/report.json, with report.png)."""
    from engine.machine import machine_info

    check_locust()
    opts.check()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for t in targets:
        if isinstance(t, Target):
            results.append(_measure(t, opts, out, say))
            continue
        label, serve_args = t
        say(f"{label}: starting nibble serve {shlex.join(serve_args)}")
        with nibble_server(label, serve_args, out / f"{safe_name(label)}-server.log") as target:
            results.append(_measure(target, opts, out, say))
    doc = {"schema": SCHEMA, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": machine_info(), "profile": opts.profile,
           "options": {k: v for k, v in asdict(opts).items() if k not in ("workload", "slo")},
           "workload": asdict(opts.workload) | {"api_key": bool(opts.workload.api_key)},
           "slo": asdict(opts.slo), "targets": results, "pass": all(r["pass"] for r in results)}
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    from loadtests.plot import write_png

    write_png(out / "report.png", doc)
    return doc


def _measure(target: Target, opts: Options, out: Path, say) -> dict:
    if not target.model:
        target.model = discover_model(target, opts.workload.api_key)
    warm_up(target, opts.workload)
    return profile(target, opts, out, say)
