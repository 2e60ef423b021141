"""The fused C++ decode step (kernels/csrc/llama_decode_cpu.cpp): where it runs, and that its
logits agree with the eager layers' on the same tokens.

With decode_activations="fp32" it keeps activations fp32 where the eager path rounds each
linear layer's input and output to bf16 (relative 2**-9 per value), so the two agree to that
rounding carried through 30 layers, not bitwise. With "int8" (the default) each linear
layer's input is also rounded to int8 per block of 32 (relative up to 2**-8 of the block's
largest value). The checks are agreement of the next-token distributions (KL divergence,
top-1), with margins over what the default model shows on a 2-core AMD EPYC, per prompt:
fp32 mean KLD 5e-4 to 1.3e-3, max 7e-3, top-1 1.0; int8 mean 2.8e-3 to 4.2e-3, max 9.4e-3,
top-1 0.91 to 1.0 (the flips are near-ties). w8a8 rounds each row of activations to int8
with one scale (the row's largest value, an outlier channel's where there is one), so the
two roundings of an input (from fp32 in the fused step, from bf16 in the eager one) differ
more: mean 0.013 to 0.043, max 0.33, and each side is as far from bf16 as from the other
(bf16 to eager 0.014 to 0.056, bf16 to fused 0.013 to 0.041). A wrong head, slot, weight or
block scale gives KLD of order 1."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import native

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    native.load() is None, reason=f"no native kernels: {native.supported() or 'build failed'}")]

# mode -> (mean KLD below, max KLD below, top-1 agreement at least), per prompt
BOUNDS = {"fp32": (5e-3, 5e-2, 0.95), "int8": (2e-2, 1e-1, 0.8), "w8a8": (0.1, 1.0, 0.7)}
QUESTIONS = ["What is the capital of France?", "Write a poem about the sea.",
             "Explain gravity to a child."]


@pytest.mark.parametrize(("quant", "mode", "rules"), [
    ("int4", "fp32", []), ("int4", "int8", []), ("int4", "int8", ["lm_head=int8"]),
    ("w8a8", "int8", []), ("int4", "int8", [r"layers\.[0-4]\..*=w8a8"])])
def test_pure_decode_steps_run_fused_and_agree_with_the_eager_layers(quant, mode, rules,
                                                                     monkeypatch):
    """With an int8 lm_head and int8 activations the fused step's logits also come from
    nibble's int8 kernel (the eager side: PyTorch's int8 op on bf16 activations). w8a8 layers,
    alone or mixed with int4 ones, run in the fused step too, their inputs rounded per row
    from fp32 where the eager path rounds the bf16 inputs."""
    llm = LLM("smollm2-135m", quant=quant, progress=False, max_model_len=256,
              decode_activations=mode, rules=rules)
    assert llm.model.native_decode_act8 == (mode == "int8")
    assert (llm.model.native_logits is not None) == ("lm_head=int8" in rules)
    assert llm.model.native_decode is not None
    model = llm.model
    fused_calls, logits = [], []
    real_layers, real_logits = model._native_layers, model.logits
    model._native_layers = lambda *a: fused_calls.append(a[0].shape[0]) or real_layers(*a)
    model.logits = lambda h: logits.append(real_logits(h)) or logits[-1]
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    n = 24
    int8_logits, real_kernel = [], native.load().int8_linear_act8
    monkeypatch.setattr(native.load(), "int8_linear_act8",
                        lambda x, *w: int8_logits.append(x.shape[0]) or real_kernel(x, *w))
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    del model._native_layers, model.logits
    # one prefill step (no fused call), then n - 1 pure decode steps of all three sequences
    assert fused_calls == [3] * (n - 1)
    assert int8_logits == ([3] * (n - 1) if llm.model.native_logits is not None else [])
    steps = torch.stack([row for step in logits for row in step.split(1)]).view(n, 3, -1)
    for i, (ids, out) in enumerate(zip(prompts, outs, strict=True)):
        fused = steps[1:, i].float().log_softmax(-1)  # decode steps: row k predicts token k + 1
        tokens = ids + out.token_ids
        eager = llm.score(tokens)[len(ids):len(ids) + n - 1].float().log_softmax(-1)
        kld = (eager.exp() * (eager - fused)).sum(-1)
        w8a8 = quant == "w8a8" or any(r.endswith("=w8a8") for r in rules)
        mean, top, top1 = BOUNDS["w8a8" if w8a8 else mode]
        assert kld.mean().item() < mean and kld.max().item() < top, kld
        assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= top1


def test_batch_invariant_keeps_the_eager_layers():
    from engine.report import kernel_report

    llm = LLM("smollm2-135m", quant="int4", progress=False, max_model_len=256,
              batch_invariant=True)
    assert llm.model.native_decode is None
    assert kernel_report(llm.model)["decode_step"] == "per layer"


def test_layers_the_fused_step_cannot_run_keep_the_eager_path():
    """bf16 layers (no int4 native kernel) and int4 with a 16-bit layer mixed in."""
    assert LLM("smollm2-135m", quant="bf16", progress=False,
               max_model_len=256).model.native_decode is None
    mixed = LLM("smollm2-135m", quant="int4", rules=[r"layers\.3\.mlp\.down_proj=int8"],
                progress=False, max_model_len=256)
    assert mixed.model.native_decode is None
    out = mixed.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].token_ids) == 4
