"""Shared fixtures: the default model is fetched once per machine into the nibble cache and
each variant is loaded once per test session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

# Kernel paths are picked by timing where nothing says otherwise (the CPU's dense-vs-fused
# crossover, the Triton tuner); tests pin the untimed defaults so results do not depend on how
# busy the machine is. Tests of the timing itself script the clock.
os.environ.setdefault("NIBBLE_TUNE", "0")

DEFAULT_MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def default_source():
    from engine import hub

    return hub.resolve_model(DEFAULT_MODEL, progress=False)


# KV cache of each shared LLM unless a test asks otherwise: 1 GB holds 21k tokens of the default
# model, more than any test keeps in flight. The engine's default (16 full-length sequences, at
# most 10% of memory) would hold 1.5 GB per cached variant, and the session caches about ten.
TEST_KV_BYTES = 1e9


@functools.cache
def _llm(quant: str, **options):
    from engine import LLM

    options.setdefault("kv_cache_memory", TEST_KV_BYTES)
    return LLM(DEFAULT_MODEL, quant=quant, progress=False, max_model_len=2048, **options)


@pytest.fixture(scope="session")
def llm_factory(default_source):
    """llm_factory("int4", **options) -> a shared LLM of the default model; loaded on first
    use. Callers must leave its engine idle."""
    return _llm


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, default_source):
    """A 2-layer Llama with random weights as a Hugging Face directory (the default model's
    tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer("gguf", default_source.path).save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _parse_model_files_once():
    """Loads let a parsed GGUF go when they finish (engine.loader.reader_cache); the session
    loads the default model's file about twenty times, so it keeps it parsed throughout."""
    from engine.loader import reader_cache

    with reader_cache():
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


# Triton picks interpreted or compiled kernels when a kernel is defined, so the choice is made
# here, before any test imports kernels/triton/: compiled on a CUDA machine, else the
# interpreter on CPU tensors (NIBBLE_TEST_INTERPRET=1 forces it on a GPU machine too).
if not torch.cuda.is_available() or os.environ.get("NIBBLE_TEST_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
