"""`nibble serve --ray` options and the pieces of the Ray path that need no Ray: the [ray]
config table, the merged /metrics of many replicas, errors that cross processes. The Ray
deployment itself is tested in tests/cluster (make test-cluster)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from engine.errors import ConfigError
from server.cluster.ingress import cluster_settings
from server.metrics import Metrics
from server.protocol import APIError
from tests.server.cli_helpers import assert_clean_error, nibble


def _settings(table=None, device="cpu", threads=None, cores=8, **flags):
    return cluster_settings(table, flags, device, threads, cores)


def test_replicas_share_this_machine_cores_unless_threads_given():
    assert _settings().replicas == 1 and _settings().cpus == 8
    assert _settings(replicas=2).cpus == 4
    assert _settings(autoscale="1:3").cpus == 2  # sized for the most replicas
    assert _settings(replicas=4, threads=1).cpus == 1
    assert _settings(cores=1, replicas=3).cpus == 1
    gpu = _settings(device="cuda:0", replicas=2)
    assert (gpu.gpus, gpu.cpus) == (1.0, 1.0)


def test_config_table_under_flags():
    table = {"replicas": 3, "router": "pow2", "address": "auto", "autoscaling": {"upscale_delay_s": 2}}
    s = _settings(table)
    assert (s.replicas, s.router, s.address, s.autoscaling) == (3, "pow2", "auto", {"upscale_delay_s": 2})
    assert _settings(table, router="prefix", address="10.0.0.1:6379").router == "prefix"
    assert _settings({"autoscale": [1, 4]}).autoscale == (1, 4)
    assert _settings({"autoscale": "2:2"}, target_ongoing=3).target_ongoing == 3
    # a flag's way of counting replicas replaces the file's
    assert (_settings({"autoscale": "1:2"}, replicas=3).replicas,
            _settings({"autoscale": "1:2"}, replicas=3).autoscale) == (3, None)
    assert _settings({"replicas": 2}, autoscale="1:3").autoscale == (1, 3)


@pytest.mark.parametrize("table, flags, fragment", [
    (None, {"replicas": 2, "autoscale": "1:2"}, "not both"),
    (None, {"autoscale": "4:1"}, "MIN <= MAX"),
    (None, {"autoscale": "0:2"}, "MIN <= MAX"),
    (None, {"autoscale": "two"}, "MIN:MAX"),
    (None, {"autoscale": "1:2:3"}, "MIN:MAX"),
    (None, {"replicas": 0}, "positive integer"),
    ({"replicas": "2"}, {}, "positive integer"),
    ({"autoscale": "1:2", "target_ongoing": -1}, {}, "positive number"),
    ({"target_ongoing": 2}, {}, "give --autoscale"),
    ({"replicas": 2, "autoscale": "1:2"}, {}, "keep one"),
    ({"router": "random"}, {}, "router must be one of prefix, pow2"),
    ({"replica": 2}, {}, "unknown key 'replica'"),
    ({"autoscaling": 3}, {}, "autoscaling must be a table"),
    ({"imbalance": -1}, {}, "imbalance must be"),
    ({"app": ""}, {}, "app must be"),
    (True, {}, "must be a table"),
])
def test_bad_options_are_config_errors(table, flags, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        _settings(table, **flags)


def test_cli_errors_before_anything_starts(tmp_path):
    assert_clean_error(nibble("serve", "--ray", "--replicas", "2", "--autoscale", "1:2"),
                       "not both")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[ray]\nreplicas = 2\n")
    assert_clean_error(nibble("generate", "-c", str(cfg), "hi"), "[ray] is read by `nibble serve`")


def test_ray_missing_is_one_clear_error(monkeypatch, capsys):
    import importlib.util

    from server.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "ray" else real(name, *a))
    assert main(["serve", "--ray"]) == 2
    assert "pip install 'nibble[cluster]'" in capsys.readouterr().err


def test_api_errors_survive_pickling():
    err = APIError(429, "full", param="x", code="queue_full")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, APIError) and back.body() == err.body() and back.status == 429


class _V:
    def __init__(self, name):
        self.name, self.quantization = name, "int4"


def test_metrics_of_replicas_merge_under_a_replica_label():
    from prometheus_client.parser import text_string_to_metric_families

    ingress, texts = Metrics(), {}
    ingress.http_status("/v1/completions", 200)
    for rid, tokens in (("a1", 5), ("b2", 7)):
        m = Metrics()
        m.generation_tokens(_V("m:int4"), tokens)
        m.first_token(_V("m:int4"), 0.03 * tokens)
        texts[rid] = m.render().decode()
    merged = ingress.render(texts).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert merged.count("# TYPE nibble_generation_tokens_total") == 1  # one family, all replicas
    gen = {s.labels["replica"]: s.value for s in families["nibble_generation_tokens"].samples}
    assert gen == {"a1": 5.0, "b2": 7.0}
    http = families["nibble_http_requests"].samples
    assert [(s.labels, s.value) for s in http] == [({"endpoint": "/v1/completions", "status": "200"}, 1.0)]
    counts = {s.labels["replica"]: s.value for s in families["nibble_time_to_first_token_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"a1": 1.0, "b2": 1.0}
    rss = [s.labels.get("replica") for s in families["process_resident_memory_bytes"].samples]
    assert sorted(rss, key=str) == sorted([None, "a1", "b2"], key=str)  # the ingress's and each replica's


def test_outputs_that_pile_up_in_a_replica_travel_as_one():
    """Steps a replica's stream could not send yet merge into one output whose new text is
    both steps' (token ids, text and logprobs are cumulative already); the prompt stays
    behind unless an echo's prompt logprobs need its ids."""
    from engine.sequence import CompletionOutput, RequestOutput
    from server.cluster.replica import _merge, _slim

    def out(step, texts, finished=False, prompt_logprobs=None):
        outs = [CompletionOutput(i, "".join(t[:step]), list(range(step)), None, None, t[step - 1])
                for i, t in enumerate(texts)]
        return RequestOutput("r0", "the prompt", [5, 6, 7], outs, finished, prompt_logprobs)

    a, b = ["x", "y", "z"], ["p", "q", "r"]
    merged = _merge(_merge(out(1, [a, b]), out(2, [a, b])), out(3, [a, b]))
    assert [c.delta for c in merged.outputs] == ["xyz", "pqr"]
    assert [c.text for c in merged.outputs] == ["xyz", "pqr"]
    assert merged.outputs[0].token_ids == [0, 1, 2]
    # a completion that finished in the earlier step repeats with no new text: nothing doubles
    first = out(1, [a, b])
    second = RequestOutput("r0", None, [], [dataclasses.replace(first.outputs[0], delta=""),
                                            CompletionOutput(1, "pq", [0, 1], None, None, "q")],
                           False)
    assert [c.delta for c in _merge(first, second).outputs] == ["x", "pq"]
    slim = _slim(out(1, [a]))
    assert slim.prompt is None and slim.prompt_token_ids == []
    assert _slim(out(1, [a], prompt_logprobs=[None, {6: -1.0}, {7: -2.0}])).prompt_token_ids == [5, 6, 7]
    err = APIError(503, "x")
    assert _slim(err) is err

