"""Hugging Face directories of each supported architecture (tiny, random weights) against
transformers' own implementation: covers safetensors streaming, Llama 3 rope scaling,
Qwen2's qkv bias and Qwen3's q/k norms."""

from __future__ import annotations

import pytest
import torch

from engine import LLM

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False)


def _configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama3": LlamaConfig(**TINY, rope_scaling=llama3, rope_theta=500000.0),
        "qwen2": Qwen2Config(**TINY),
        "qwen3": Qwen3Config(**TINY, head_dim=32),
        "tied-llama": LlamaConfig(**{**TINY, "tie_word_embeddings": True}),
    }


@pytest.fixture(scope="module")
def tokenizer(default_source):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer("gguf", default_source.path)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "tied-llama"])
def test_hf_directory_matches_transformers(tmp_path, tokenizer, arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_configs()[arch], dtype=torch.float32).eval()
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in hf.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:100]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = LLM(str(tmp_path), quant="fp32", progress=False, max_model_len=512).score(ids)
    assert (ours - ref).abs().max().item() <= 1e-3
