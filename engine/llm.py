"""The public Python API: LLM(...).generate / .chat."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from engine import build
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.loader import reader_cache
from engine.model_runner import ModelRunner, num_kv_blocks
from engine.plan import check_fits
from engine.progress import counter
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput
from engine.tokenizer import apply_chat_template, eos_ids

Prompt = str | list[int]


class LLM:
    """LLM("smollm2-135m", quant="int4"): an alias, HF directory, .gguf file or own checkpoint."""

    def __init__(self, model: str = "smollm2-135m", quant: str | None = None,
                 rules: tuple[str, ...] | list[str] = (), device: str = "cpu",
                 max_model_len: int | None = None, seed: int = 0, threads: int | None = None,
                 progress: bool = True, config: EngineConfig | None = None, **options):
        """options: the other EngineConfig fields (max_num_seqs, max_num_batched_tokens,
        block_size, kv_cache_memory, batch_invariant, decode_activations); an unknown one is an
        error naming the valid ones."""
        self.config = config or EngineConfig.from_dict(dict(
            model=model, quant=quant, rules=list(rules), device=device,
            max_model_len=max_model_len, seed=seed, threads=threads, **options))
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        with reader_cache():  # the estimate and the load read one parse of the file
            check_fits([self.config])  # before any weight is read: refuse what cannot fit
            self.loaded = build.load(self.config, progress=progress)
        self.tokenizer = self.loaded.tokenizer
        c, device = self.config, torch.device(self.config.device)
        blocks = num_kv_blocks(self.loaded.model, device, self.loaded.max_model_len, c.block_size,
                               c.max_num_seqs, c.kv_cache_memory)
        runner = ModelRunner(self.loaded.model, self.loaded.max_model_len, device, blocks,
                             c.block_size)
        eos = eos_ids(self.tokenizer, self.loaded.config.eos_token_ids)
        self.engine = LLMEngine(runner, self.tokenizer, eos, self.loaded.source.name,
                                c.max_num_seqs, c.max_num_batched_tokens)
        self._ids = itertools.count()

    @property
    def model(self):
        return self.loaded.model

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is text or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self._add(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.encode_chat(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] (fp32): row i predicts token i + 1."""
        if self.engine.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        return self.engine.runner.score(token_ids, self.engine.blocks)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return apply_chat_template(self.tokenizer, messages)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams) -> Iterator[RequestOutput]:
        """Yields an output after every step; ``delta`` holds the text that became final."""
        rid = self._add(prompt, sampling_params)
        while True:
            for out in self.engine.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        rid = str(next(self._ids))
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.engine.add_request(rid, ids, params, prompt=text)
        return rid

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with counter(len(request_ids), desc="generating", unit="req", enabled=use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in request_ids]
