"""Prometheus metrics, labelled by model variant and quantization.

Latencies and token counts are observed on the event loop as outputs arrive; the engine's own
state (running, waiting, KV blocks, preemptions, prefix-cache hits) is read from the engine
thread's last snapshot when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LABELS = ("model", "quantization")
# Seconds. CPU decode steps take tens of milliseconds, first tokens up to seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
# Nats. Per-token KL divergence of a served variant from its reference spans decades: 8-bit
# weights sit near 1e-3, 4-bit near 0.05-0.5, a broken variant above 1.
KLD_BUCKETS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SHADOW_LABELS = ("served", "reference")
SHADOW_OUTCOMES = ("scored", "dropped", "skipped", "failed")


def _labels(variant) -> tuple[str, str]:
    return variant.name, variant.quantization


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("nibble_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.",
                              LABELS, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("nibble_inter_token_latency_seconds",
                             "Time between consecutive tokens of one completion.",
                             LABELS, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("nibble_e2e_request_latency_seconds",
                             "Time from a request's arrival to its end.",
                             LABELS, buckets=E2E_BUCKETS, registry=r)
        self.prompt = Counter("nibble_prompt_tokens", "Prompt tokens received.", LABELS, registry=r)
        self.generation = Counter("nibble_generation_tokens", "Tokens generated.", LABELS, registry=r)
        self.requests = Counter("nibble_requests_finished", "Finished completions by finish "
                                "reason (stop, length, abort).", (*LABELS, "finish_reason"),
                                registry=r)
        self.http = Counter("nibble_http_requests", "HTTP responses by endpoint and status.",
                            ("endpoint", "status"), registry=r)
        self.shadow_kld = Histogram(
            "nibble_shadow_kld", "Shadow A/B: per-token KL divergence (nats) of the served "
            "variant's next-token distribution from the reference's, on the tokens it served.",
            SHADOW_LABELS, buckets=KLD_BUCKETS, registry=r)
        self.shadow_tokens = Counter("nibble_shadow_tokens", "Shadow A/B: served tokens scored "
                                     "by the reference.", SHADOW_LABELS, registry=r)
        self.shadow_top1 = Counter("nibble_shadow_top1_agreement", "Shadow A/B: scored tokens "
                                   "where the served variant's and the reference's most likely "
                                   "token agree.", SHADOW_LABELS, registry=r)
        self.shadow_requests = Counter(
            "nibble_shadow_requests", "Shadow A/B: sampled completions by outcome (scored; "
            "dropped: the backlog was full; skipped: longer than the reference's context; "
            "failed).", (*SHADOW_LABELS, "outcome"), registry=r)
        self.engine = None
        r.register(_EngineCollector(self))
        # process_resident_memory_bytes, CPU seconds, open files: what load tests watch
        ProcessCollector(registry=r)

    def watch(self, engine) -> None:
        """Reads the engine's stats from now on; every variant's series start at 0, so a
        scraper sees them before the first request."""
        self.engine = engine
        for v in engine.variants.values():
            for metric in (self.ttft, self.itl, self.e2e, self.prompt, self.generation):
                metric.labels(*_labels(v))
            for reason in ("stop", "length", "abort"):
                self.requests.labels(*_labels(v), reason)

    def prompt_tokens(self, variant, n: int) -> None:
        self.prompt.labels(*_labels(variant)).inc(n)

    def generation_tokens(self, variant, n: int) -> None:
        self.generation.labels(*_labels(variant)).inc(n)

    def first_token(self, variant, seconds: float) -> None:
        self.ttft.labels(*_labels(variant)).observe(seconds)

    def inter_token(self, variant, seconds: float) -> None:
        self.itl.labels(*_labels(variant)).observe(seconds)

    def finished(self, variant, reason: str, seconds: float) -> None:
        self.requests.labels(*_labels(variant), reason).inc()
        self.e2e.labels(*_labels(variant)).observe(seconds)

    def watch_shadow(self, pairs: list[tuple[str, str]]) -> None:
        for pair in pairs:
            for metric in (self.shadow_kld, self.shadow_tokens, self.shadow_top1):
                metric.labels(*pair)
            for outcome in SHADOW_OUTCOMES:
                self.shadow_requests.labels(*pair, outcome)

    def shadow_scored(self, pair: tuple[str, str], kld: list[float], agree: int) -> None:
        hist = self.shadow_kld.labels(*pair)
        for x in kld:
            hist.observe(x)
        self.shadow_tokens.labels(*pair).inc(len(kld))
        self.shadow_top1.labels(*pair).inc(agree)
        self.shadow_request(pair, "scored")

    def shadow_request(self, pair: tuple[str, str], outcome: str) -> None:
        self.shadow_requests.labels(*pair, outcome).inc()

    def http_status(self, endpoint: str, status: int) -> None:
        self.http.labels(endpoint, str(status)).inc()

    def render(self, replicas: dict[str, str] | None = None) -> bytes:
        """The exposition text; `replicas` ({replica id: that replica's own exposition text})
        merges every replica's series in, each under a `replica` label."""
        if not replicas:
            return generate_latest(self.registry)
        families = {f.name: f for f in self.registry.collect()}
        for replica, text in sorted(replicas.items()):
            for fam in text_string_to_metric_families(text):
                samples = [s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples]
                if fam.name in families:
                    families[fam.name].samples.extend(samples)
                else:
                    fam.samples = samples
                    families[fam.name] = fam
        return generate_latest(_Families(list(families.values())))


class _EngineCollector:
    """Gauges and counters read from each engine's last stats snapshot at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # families vary with the loaded variants; collected on demand

    def collect(self):
        gauges = {
            "nibble_requests_running": ("Sequences in the running batch.", lambda s: s.running),
            "nibble_requests_waiting": ("Sequences waiting to be scheduled.", lambda s: s.waiting),
            "nibble_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.",
                                            lambda s: s.kv_blocks_used / max(1, s.kv_blocks_used + s.kv_blocks_free)),
            "nibble_kv_blocks_free": ("Free KV-cache blocks.", lambda s: s.kv_blocks_free),
            "nibble_kv_blocks_total": ("KV-cache blocks.", lambda s: s.kv_blocks_used + s.kv_blocks_free),
        }
        counters = {
            "nibble_preemptions": ("Sequences preempted (recomputed later) for lack of KV blocks.",
                                   lambda s: s.preemptions),
            "nibble_prefix_cache_hit_tokens": ("Prompt tokens served from cached KV blocks.",
                                               lambda s: s.prefix_cache_hit_tokens),
            "nibble_prefix_cache_queried_tokens": ("Prompt tokens looked up in the prefix cache.",
                                                   lambda s: s.prefix_cache_queried_tokens),
        }
        engine = self.metrics.engine
        variants = list(engine.variants.values()) if engine is not None else []
        for name, (doc, get) in gauges.items():
            fam = GaugeMetricFamily(name, doc, labels=LABELS)
            for v in variants:
                fam.add_metric(_labels(v), get(engine.stats(v.name)))
            yield fam
        for name, (doc, get) in counters.items():
            fam = CounterMetricFamily(name, doc, labels=LABELS)
            for v in variants:
                fam.add_metric(_labels(v), get(engine.stats(v.name)))
            yield fam


class _Families:
    """Metric families already collected, for generate_latest."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families
