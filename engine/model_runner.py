"""Builds the flat batch of a step, runs the model, samples.

The scheduler says which sequences run and how many of their tokens; the runner concatenates
those tokens into one flat batch, runs one forward pass over the paged KV cache, and samples
one token for every sequence whose known tokens are now all computed (a prompt chunk that
ends mid-prompt samples nothing).
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager, BlockTable
from engine.layers.attention import AttentionBatch, KVCache, decode_kernel_for, kv_dtype
from engine.machine import device_memory
from engine.models.llama import LlamaModel
from engine.sampler import logprob_dicts, sample
from engine.sequence import Sequence
from kernels.dispatch import backend_for


def num_kv_blocks(model: LlamaModel, device: torch.device, max_model_len: int, block_size: int,
                  max_num_seqs: int, memory: float | None) -> int:
    """KV blocks for a memory budget: bytes (> 1) or a fraction of the device's memory; None
    is enough for max_num_seqs sequences of max_model_len, at most 10% of the memory (on CPU,
    what a container's cgroup allows where that is less than the machine has). Never
    fewer than one full-length sequence needs."""
    cfg = model.config
    per_block = KVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads,
                                        cfg.head_dim, kv_dtype(model.policy.act_dtype, device))
    seq_blocks = -(-max_model_len // block_size)
    return kv_budget(per_block, seq_blocks, max_num_seqs, memory, device_memory(device))


def kv_budget(per_block: int, seq_blocks: int, max_num_seqs: int, memory: float | None,
              total: int) -> int:
    """num_kv_blocks' rule on numbers: blocks of per_block bytes within a device of `total`
    bytes, never fewer than one sequence of seq_blocks."""
    if memory is None:
        budget = min(max_num_seqs * seq_blocks * per_block, 0.1 * total)
    else:
        budget = memory * total if memory <= 1 else memory
    return max(int(budget // per_block), seq_blocks)


class ModelRunner:
    def __init__(self, model: LlamaModel, max_model_len: int, device: torch.device,
                 num_blocks: int, block_size: int):
        cfg = model.config
        self.model, self.device = model, device
        self.max_model_len = max_model_len
        self.cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                             cfg.head_dim, kv_dtype(model.policy.act_dtype, device), device)
        # decode attention through a paged kernel: Triton's where the GEMMs run on Triton,
        # nibble's C++ one on CPUs that run it
        self.decode_kernel = decode_kernel_for(device, cfg.head_dim,
                                               backend_for(device) == "triton")

    def run(self, scheduled: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Computes each sequence's next n tokens; returns the sequences that sampled."""
        ids, positions, tables, qlens, ctxs, last_rows, to_sample = [], [], [], [], [], [], []
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, row, prompt token it predicts)
        row = 0
        for seq, n in scheduled:
            start = seq.num_cached
            ids += seq.token_ids_between(start, start + n)
            positions.append(torch.arange(start, start + n))
            tables.append(seq.block_table.blocks)
            qlens.append(n)
            ctxs.append(start + n)
            prompt_rows += [(seq, row + p - start, seq.prompt_token_ids[p + 1])
                            for p in seq.prompt_logprob_positions(start, start + n)]
            row += n
            if start + n == seq.num_tokens:
                last_rows.append(row - 1)
                to_sample.append(seq)
        batch = AttentionBatch.build(tables, qlens, ctxs, self.cache, self.device,
                                     self.decode_kernel)
        hidden = self.model(torch.tensor(ids, device=self.device),
                            torch.cat(positions).to(self.device), batch)
        for seq, n in scheduled:
            seq.num_cached += n
        if prompt_rows:
            self._prompt_logprobs(hidden, prompt_rows)
        if not to_sample:
            return []
        rows = torch.tensor(last_rows, device=self.device)
        logits = self.model.logits(hidden[rows]).cpu()  # sampling and its seeds live on the CPU
        for seq, (token, logprobs) in zip(to_sample, sample(logits, to_sample), strict=True):
            seq.append(token, logprobs)
        return to_sample

    def _prompt_logprobs(self, hidden: torch.Tensor,
                         prompt_rows: list[tuple[Sequence, int, int]]) -> None:
        """Appends to each sequence's prompt_logprobs the entries its rows of this step give
        (rows in position order, so appending keeps prompt order)."""
        rows = torch.tensor([r for _, r, _ in prompt_rows], device=self.device)
        logits = self.model.logits(hidden[rows]).cpu()
        by_k: dict[int, list[int]] = {}
        for i, (seq, _, _) in enumerate(prompt_rows):
            by_k.setdefault(seq.params.prompt_logprobs, []).append(i)
        for k, idx in by_k.items():
            dicts = logprob_dicts(logits[idx], [prompt_rows[i][2] for i in idx], k)
            for i, d in zip(idx, dicts, strict=True):
                prompt_rows[i][0].prompt_logprobs.append(d)

    def score(self, token_ids: list[int], blocks: BlockManager) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] fp32 of a token list, in one prefill, in blocks
        borrowed from the pool for the call."""
        t = len(token_ids)
        if not 0 < t <= self.max_model_len:
            raise ValueError(f"score needs 1..{self.max_model_len} tokens, got {t}")
        table = BlockTable()
        if not blocks.can_grow(table, t):
            raise RuntimeError(f"score needs {blocks.blocks_for(t)} free KV blocks, "
                               f"{blocks.num_free} are free")
        blocks.grow(table, t)
        try:
            batch = AttentionBatch.build([table.blocks], [t], [t], self.cache, self.device)
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            hidden = self.model(ids, torch.arange(t, device=self.device), batch)
            return self.model.logits(hidden)
        finally:
            blocks.free(table)
