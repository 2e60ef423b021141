"""From the per-request records of a load run to the numbers of its report: latency
percentiles, throughput, goodput under an SLO, series over time, and the cross-check of the
client's counts against the server's /metrics.

Definitions (the same for every target, so that nibble, vLLM and llama.cpp compare):
  TTFT      request sent -> first chunk with text, per accepted request
  ITL       gap between consecutive text chunks, over every token of every accepted request
  TPOT      per request: (last text chunk - first) / (tokens - 1)
  good      a request that succeeded with TTFT <= the SLO's TTFT and TPOT <= the SLO's ITL
            (vLLM's --goodput rule)
  goodput   good requests per second of the sending window; its ratio to the offered load is
            good / sent
  SLO pass  p99 TTFT and p99 ITL of the accepted requests within the SLO, and no error other
            than 429 refusals
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SLO:
    ttft_p99_ms: float = 2000.0
    itl_p99_ms: float = 250.0
    goodput_ratio: float = 0.9  # the ramp's capacity: the highest rate whose good/sent reaches this
    max_rss_growth_mb: float | None = None  # soak: fail beyond this host-memory growth

    @classmethod
    def load(cls, name: str | None) -> SLO:
        """A TOML file, or the name of an SLO preset in configs/ (slo-cpu); a [slo] table or
        top-level keys. Mistakes raise ConfigError (a ValueError)."""
        from engine.config_files import read_config
        from engine.errors import ConfigError

        if not name:
            return cls()
        data = read_config(name, kind="slo")
        data = data.get("slo", data)
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"{name}: unknown SLO keys {unknown}; known: {sorted(known)}")
        slo = cls(**{k: float(v) for k, v in data.items()})
        if slo.ttft_p99_ms <= 0 or slo.itl_p99_ms <= 0 or not 0 < slo.goodput_ratio <= 1:
            raise ConfigError(f"{name}: limits must be positive and goodput_ratio in (0, 1]")
        return slo


def read_records(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def tpot(r: dict) -> float | None:
    gaps, tokens = r.get("gaps") or [], r.get("tokens") or 0
    return sum(gaps) / (tokens - 1) if gaps and tokens > 1 else None


def is_good(r: dict, slo: SLO) -> bool:
    if not r.get("ok") or r.get("ttft") is None:
        return False
    t = tpot(r)
    return r["ttft"] * 1000 <= slo.ttft_p99_ms and (t is None or t * 1000 <= slo.itl_p99_ms)


def summarize(records: list[dict], slo: SLO, window: float) -> dict:
    """The numbers of one run; `window` is the sending time in seconds (the offered load's
    denominator)."""
    sent = [r for r in records if r.get("error") != "client_saturated"]
    ok = [r for r in sent if r.get("ok")]
    statuses: dict[str, int] = {}
    for r in sent:
        key = str(r.get("status") or "error")
        statuses[key] = statuses.get(key, 0) + 1
    refused = sum(1 for r in sent if r.get("status") == 429)
    server_errors = sum(1 for r in sent if (r.get("status") or 0) >= 500)
    other_errors = len(sent) - len(ok) - refused
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    gaps = [g for r in ok for g in r.get("gaps") or []]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    e2e = [r["end"] - r["start"] for r in ok]
    tokens = sum(r.get("tokens") or 0 for r in ok)
    good = sum(1 for r in ok if is_good(r, slo))
    span = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else 0.0
    p99_ttft, p99_itl = percentile(ttft, 99), percentile(gaps, 99)
    checks = {
        "ttft_p99": p99_ttft is not None and p99_ttft * 1000 <= slo.ttft_p99_ms,
        "itl_p99": p99_itl is None or p99_itl * 1000 <= slo.itl_p99_ms,
        "no_errors": other_errors == 0,
        "served_some": bool(ok),
    }
    return {
        "requests": {"sent": len(sent), "ok": len(ok), "refused_429": refused,
                     "server_errors_5xx": server_errors, "other_errors": other_errors,
                     "client_saturated": len(records) - len(sent), "by_status": statuses,
                     "error_samples": sorted({r["error"] for r in sent if r.get("error")})[:5]},
        "offered_rps": round(len(sent) / window, 4) if window else None,
        "throughput": {"requests_per_s": round(len(ok) / span, 4) if span else 0.0,
                       "output_tokens_per_s": round(tokens / span, 2) if span else 0.0,
                       "output_tokens": tokens, "span_s": round(span, 2)},
        "ttft_ms": {f"p{q}": _ms(percentile(ttft, q)) for q in (50, 90, 99)}
        | {"mean": _ms(sum(ttft) / len(ttft)) if ttft else None},
        "itl_ms": {f"p{q}": _ms(percentile(gaps, q)) for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": _ms(percentile(tpots, q)) for q in (50, 99)},
        "e2e_ms": {f"p{q}": _ms(percentile(e2e, q)) for q in (50, 99)},
        "goodput": {"good": good, "requests_per_s": round(good / window, 4) if window else None,
                    "ratio": round(good / len(sent), 4) if sent else 0.0},
        "slo": {"limits": asdict(slo), "checks": checks, "pass": all(checks.values())},
    }


def chunk_times(r: dict) -> list[float]:
    """Wall time of each text chunk of a request."""
    if r.get("ttft") is None:
        return []
    return list(itertools.accumulate(r.get("gaps") or [], initial=r["start"] + r["ttft"]))


def series(records: list[dict], origin: float, bucket: float) -> dict:
    """Per `bucket` seconds from `origin`: output tokens/s (counted at each chunk's arrival),
    finished requests/s, and TTFT (by request start) and ITL (by chunk arrival) p50/p99."""
    rows: dict[int, dict] = {}

    def row(t: float) -> dict:
        return rows.setdefault(int((t - origin) // bucket),
                               {"tokens": 0.0, "done": 0, "ttft": [], "itl": [], "refused": 0})

    for r in records:
        if not r.get("ok"):
            if r.get("status") == 429:
                row(r["start"])["refused"] += 1
            continue
        times = chunk_times(r)
        per_chunk = (r.get("tokens") or len(times)) / max(1, len(times))
        for t in times:
            row(t)["tokens"] += per_chunk
        for t, gap in zip(times[1:], r.get("gaps") or [], strict=False):
            row(t)["itl"].append(gap)
        row(r["start"])["ttft"].append(r["ttft"])
        row(r["end"])["done"] += 1
    out = {"t": [], "tokens_per_s": [], "requests_per_s": [], "refused_per_s": [],
           "ttft_p50_ms": [], "ttft_p99_ms": [], "itl_p50_ms": [], "itl_p99_ms": []}
    for i in range(min(rows, default=0), max(rows, default=-1) + 1):
        b = rows.get(i, {"tokens": 0.0, "done": 0, "ttft": [], "itl": [], "refused": 0})
        out["t"].append(round((i + 0.5) * bucket, 3))
        out["tokens_per_s"].append(round(b["tokens"] / bucket, 3))
        out["requests_per_s"].append(round(b["done"] / bucket, 3))
        out["refused_per_s"].append(round(b["refused"] / bucket, 3))
        for key, values in (("ttft", b["ttft"]), ("itl", b["itl"])):
            out[f"{key}_p50_ms"].append(_ms(percentile(values, 50)))
            out[f"{key}_p99_ms"].append(_ms(percentile(values, 99)))
    return out


# Counters other servers expose under their own names: the first one found is used.
SERVER_TOKENS = ("nibble_generation_tokens_total", "vllm:generation_tokens_total",
                 "llamacpp:tokens_predicted_total", "tgi_request_generated_tokens_sum")
SERVER_TTFT = ("nibble_time_to_first_token_seconds", "vllm:time_to_first_token_seconds")


def cross_check(records: list[dict], before: dict[str, float], after: dict[str, float],
                max_tokens: int) -> dict:
    """Client counts against the server's counter deltas over the same run. Tokens must agree
    to within 5% or one request's worth; TTFT means are reported side by side (the server's
    clock starts when it has read the request, the client's when it sent it)."""
    out: dict = {"agree": True, "notes": []}
    client_tokens = sum(r.get("tokens") or r.get("chunks") or 0 for r in records)
    name = next((n for n in SERVER_TOKENS if n in after), None)
    if name is None:
        out["notes"].append("the server exposes no generated-token counter this tool knows")
    else:
        server = after[name] - before.get(name, 0.0)
        diff = server - client_tokens
        out["tokens"] = {"metric": name, "client": client_tokens, "server": server, "diff": diff}
        if abs(diff) > max(0.05 * max(client_tokens, 1), max_tokens):
            out["agree"] = False
            out["notes"].append(f"generated tokens disagree: client {client_tokens}, server "
                                f"{server:g} ({name})")
    ttft = next((n for n in SERVER_TTFT if f"{n}_count" in after), None)
    ok = [r["ttft"] for r in records if r.get("ok") and r.get("ttft") is not None]
    if ttft and ok:
        count = after[f"{ttft}_count"] - before.get(f"{ttft}_count", 0.0)
        total = after[f"{ttft}_sum"] - before.get(f"{ttft}_sum", 0.0)
        if count > 0:
            out["ttft_mean_ms"] = {"client": _ms(sum(ok) / len(ok)), "server": _ms(total / count)}
    return out


def fmt(x, unit: str = "", digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def table(results: list[dict]) -> str:
    """The terminal summary: one column per target, one row per number."""
    rows = [("target", lambda r, s: r["label"]),
            ("offered req/s", lambda r, s: fmt(s["offered_rps"], digits=2)),
            ("served req/s", lambda r, s: fmt(s["throughput"]["requests_per_s"], digits=2)),
            ("output tok/s", lambda r, s: fmt(s["throughput"]["output_tokens_per_s"], digits=1)),
            ("TTFT p50 / p99", lambda r, s: f"{fmt(s['ttft_ms']['p50'], ' ms')} / "
                                            f"{fmt(s['ttft_ms']['p99'], ' ms')}"),
            ("ITL p50 / p99", lambda r, s: f"{fmt(s['itl_ms']['p50'], ' ms')} / "
                                           f"{fmt(s['itl_ms']['p99'], ' ms')}"),
            ("goodput", lambda r, s: f"{fmt(s['goodput']['requests_per_s'], ' req/s', 2)} "
                                     f"({100 * s['goodput']['ratio']:.0f}%)"),
            ("sent / ok / 429 / 5xx / other",
             lambda r, s: "{sent} / {ok} / {refused_429} / {server_errors_5xx} / {other_errors}"
             .format(**s["requests"])),
            ("server peak RSS", lambda r, s: fmt(r.get("memory", {}).get("peak_rss_mb"), " MB")),
            ("capacity (ramp)", lambda r, s: fmt(r.get("capacity_rps"), " req/s", 2)),
            ("RSS growth: run / 2nd half", lambda r, s: f"{fmt(r['soak'].get('rss_growth_mb'), ' MB', 1)} / "
             f"{fmt(r['soak'].get('rss_growth_second_half_mb'), ' MB', 1)} "
             f"({fmt(r['soak'].get('rss_slope_second_half_mb_per_min'), ' MB/min', 2)})"),
            ("KV blocks not returned", lambda r, s: fmt(r["soak"].get("kv_blocks_not_returned"))),
            ("p99s within SLO", lambda r, s: "yes" if s["slo"]["pass"] else "no"),
            ("result", lambda r, s: "PASS" if r["pass"] else
             "FAIL: " + ", ".join(k for k, ok in r["checks"].items() if not ok))]
    # rows of one profile only where some target has them
    needs = {"capacity (ramp)": "capacity_rps", "RSS growth: run / 2nd half": "soak",
             "KV blocks not returned": "soak"}
    cells = [[name] + [get(r, r["summary"]) if needs.get(name, "summary") in r else "-"
                       for r in results]
             for name, get in rows if any(needs.get(name, "summary") in r for r in results)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    for r in results:
        lines += [f"{r['label']}: {note}" for note in r.get("notes", [])]
    return "\n".join(lines)
