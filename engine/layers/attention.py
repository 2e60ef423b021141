"""Attention over a flat batch with a paged KV cache.

The model sees all sequences of a step concatenated into T rows; AttentionBatch says which
rows belong to which sequence and which cache slots hold each one's keys and values. The cache
is a pool of fixed-size blocks (engine/block_manager.py hands them out): slot s of layer l is
k[l][:, s] / v[l][:, s] (one row per kv head), and a sequence's block table lists its blocks in
order, so token i of a sequence sits in slot table[i // block_size] * block_size + i % block_size.
Heads come first so that gathering a sequence's slots gives the contiguous [kv_heads, ctx,
head_dim] SDPA wants: with slot-major storage the gathered keys are a transposed view, and
SDPA on that took 3.6x as long (16 decode sequences, 2-core AVX2 CPU).

Per layer, every new row's key and value is written first, then attention reads: a sequence
may read blocks another sequence of the same step has just written (a shared prompt prefix).

The sequences of a step that decode one token go through one call of a paged decode kernel,
which reads the cache through the block tables in place: kernels/triton/paged_attention.py
where the GEMMs run on Triton (CUDA), kernels/csrc/paged_attention_cpu.cpp on CPUs with AVX2
(one call per layer instead of one SDPA call and one gather per sequence: at 16 decoding
sequences that was 480 SDPA calls a step). Prompt chunks use SDPA per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def decode_kernel_for(device: torch.device, head_dim: int, triton: bool) -> str | None:
    """The paged decode kernel for this device: "triton" where the GEMMs run on Triton,
    "native" on a CPU that runs kernels/csrc (head_dim a multiple of 8), else None (SDPA per
    sequence)."""
    if triton:
        return "triton"
    if device.type == "cpu" and head_dim % 8 == 0:
        from kernels import native

        return "native" if native.load() is not None else None
    return None


def kv_dtype(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU: its bf16 kernels for small attention matmuls are ~5x slower than fp32
    (measured: 153 vs 28 us per decode SDPA call, 2-core AVX512-BF16); activations elsewhere."""
    return torch.float32 if device.type == "cpu" else act_dtype


class KVCache:
    """Keys and values per layer: [kv_heads, num_blocks * block_size, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def slots(self, block_table: list[int], start: int, end: int) -> Tensor:
        """Cache slots of token positions start..end-1 of a sequence with this block table."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass
class DecodeRows:
    """The one-row sequences of a batch, laid out for the paged decode kernel."""

    seqs: list[int]  # their indices among the batch's sequences
    rows: Tensor  # [B] their rows in the flat batch
    tables: Tensor  # int32 [B, max blocks], padded
    lens: Tensor  # int32 [B] context lengths
    kernel: str = "triton"  # or "native"


@dataclass
class AttentionBatch:
    """Per-sequence layout of one forward pass (sequences in row order).

    query_lens[i] rows of sequence i are in this forward and are the last rows of its
    context_lens[i] tokens; write_slots [T] is where each row's key and value go.
    gather_index() lists, sequence after sequence, the rows of a layer's cache viewed as
    [kv_heads * slots, head_dim] that hold each sequence's whole context, head by head: one
    index_select per layer gathers every sequence's keys as contiguous [kv_heads, ctx,
    head_dim] pieces (one gather per sequence cost 22 us each, as much as its attention call).
    Only the SDPA path needs it, so it is built on first use (a step whose rows all go through
    a paged decode kernel never builds it).
    """

    query_lens: list[int]
    context_lens: list[int]
    write_slots: Tensor
    block_tables: list[list[int]]
    cache: KVCache
    decode: DecodeRows | None = None
    device: torch.device | str = "cpu"
    _kv_index: Tensor | None = None

    def gather_index(self) -> Tensor:
        if self._kv_index is None:
            kv_heads, num_slots = self.cache.k[0].shape[:2]
            heads = torch.arange(kv_heads)[:, None] * num_slots
            reads = [self.cache.slots(t, 0, c)
                     for t, c in zip(self.block_tables, self.context_lens, strict=True)]
            self._kv_index = torch.cat([(heads + r).reshape(-1) for r in reads]).to(self.device)
        return self._kv_index

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], context_lens: list[int],
              cache: KVCache, device: torch.device | str = "cpu",
              decode_kernel: str | None = None) -> AttentionBatch:
        """decode_kernel: send one-row sequences through that paged decode kernel ("triton"
        or "native", see decode_kernel_for)."""
        for q, c, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 0 < q <= c <= len(table) * cache.block_size:
                raise ValueError(f"bad attention layout: query {q}, context {c}, "
                                 f"{len(table)} blocks of {cache.block_size}")
        writes = torch.cat([cache.slots(t, c - q, c)
                            for t, q, c in zip(block_tables, query_lens, context_lens, strict=True)])
        decode = None
        one_row = [i for i, q in enumerate(query_lens) if q == 1]
        if decode_kernel and one_row:
            rows = torch.tensor(query_lens).cumsum(0)[one_row] - 1
            width = max(len(block_tables[i]) for i in one_row)
            tables = torch.tensor([block_tables[i] + [0] * (width - len(block_tables[i]))
                                   for i in one_row], dtype=torch.int32)
            lens = torch.tensor([context_lens[i] for i in one_row], dtype=torch.int32)
            decode = DecodeRows(one_row, rows.to(device), tables.to(device), lens.to(device),
                                decode_kernel)
        return cls(list(query_lens), list(context_lens), writes.to(device),
                   [list(t) for t in block_tables], cache, decode, device)

    @classmethod
    def single(cls, query_len: int, context_len: int, cache: KVCache) -> AttentionBatch:
        """One sequence in blocks 0, 1, 2, ... (tests)."""
        n = -(-context_len // cache.block_size)
        return cls.build([list(range(n))], [query_len], [context_len], cache, cache.k[0].device)


def _mask(query_len: int, context_len: int, device) -> Tensor | None:
    """Causal mask for queries that sit at the end of a longer context, or None if trivial."""
    if query_len == 1:
        return None
    past = context_len - query_len
    cols = torch.arange(context_len, device=device)
    rows = torch.arange(query_len, device=device)[:, None]
    return cols <= rows + past  # [query_len, context_len] bool


def paged_attention(layer: int, q: Tensor, k: Tensor, v: Tensor, batch: AttentionBatch,
                    scale: float) -> Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]; writes k/v into the cache first."""
    kc, vc = batch.cache.k[layer], batch.cache.v[layer]
    kc.index_copy_(1, batch.write_slots, k.transpose(0, 1).to(kc.dtype))
    vc.index_copy_(1, batch.write_slots, v.transpose(0, 1).to(vc.dtype))
    q = q.to(kc.dtype)
    if batch.decode is not None:
        return _with_decode_kernel(q, kc, vc, batch, scale).to(k.dtype)
    # Otherwise one attention call per sequence, on exactly its own context: a row's result is then
    # bitwise the same whatever else is in the batch (a padded, masked batch call measured
    # 10-20% faster at 16 sequences but sums softmax over the padded width: last-bit
    # differences that flipped near-tie greedy tokens against the same request run alone).
    contexts = _Contexts(kc, vc, batch)
    outs = [_sdpa(q[start:start + qlen], *contexts.get(i, ctx), scale)
            for i, (start, qlen, ctx) in enumerate(_spans(batch))]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.to(k.dtype)


def _spans(batch: AttentionBatch):
    """(first row, query rows, context length) per sequence, in row order."""
    start = 0
    for qlen, ctx in zip(batch.query_lens, batch.context_lens, strict=True):
        yield start, qlen, ctx
        start += qlen


# Gathered contexts of one layer larger than this are gathered sequence by sequence instead.
_GATHER_ONCE_MAX_BYTES = 64 << 20


class _Contexts:
    """Each sequence's keys and values as contiguous [1, Hkv, ctx, D], from one index_select
    per layer (or one per sequence where the whole batch's would be large)."""

    def __init__(self, kc: Tensor, vc: Tensor, batch: AttentionBatch, once: bool = True):
        self.kv_heads, _, self.head_dim = kc.shape
        self.kc, self.vc = kc.view(-1, self.head_dim), vc.view(-1, self.head_dim)
        self.index = batch.gather_index()
        self.offsets = [0]
        for ctx in batch.context_lens:
            self.offsets.append(self.offsets[-1] + self.kv_heads * ctx)
        self.keys = self.values = None
        nbytes = self.index.numel() * self.head_dim * kc.element_size()
        if once and nbytes <= _GATHER_ONCE_MAX_BYTES:
            self.keys = self.kc.index_select(0, self.index)
            self.values = self.vc.index_select(0, self.index)

    def get(self, i: int, ctx: int) -> tuple[Tensor, Tensor]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if self.keys is not None:
            keys, values = self.keys[lo:hi], self.values[lo:hi]
        else:
            idx = self.index[lo:hi]
            keys, values = self.kc.index_select(0, idx), self.vc.index_select(0, idx)
        shape = (1, self.kv_heads, ctx, self.head_dim)
        return keys.view(shape), values.view(shape)


def _sdpa(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """One sequence: q [qlen, H, D] (the last qlen rows of its context), keys and values
    [1, Hkv, ctx, D] -> [qlen, H*D]."""
    qlen, ctx = q.shape[0], keys.shape[2]
    qs = q.transpose(0, 1).unsqueeze(0)  # [1, H, qlen, D]
    causal = qlen == ctx and qlen > 1
    mask = None if causal else _mask(qlen, ctx, q.device)
    o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, is_causal=causal,
                                       scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(qlen, -1)


def _with_decode_kernel(q: Tensor, kc: Tensor, vc: Tensor, batch: AttentionBatch,
                        scale: float) -> Tensor:
    """One-row sequences in one paged-kernel call, the rest through SDPA."""
    d = batch.decode
    if d.kernel == "native":
        from kernels import native

        paged_decode_attention = native.load().paged_decode_attention
    else:
        from kernels.triton.paged_attention import paged_decode_attention
    pure = len(d.seqs) == len(batch.query_lens)  # every row decodes: q's rows are d.rows
    # the kernels take q and [slots, Hkv, D] by strides (a transposed view, no copy)
    o = paged_decode_attention(q if pure else q[d.rows], kc.transpose(0, 1), vc.transpose(0, 1),
                               d.tables, d.lens, batch.cache.block_size, scale)
    if pure:
        return o.view(q.shape[0], -1)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    out[d.rows] = o.reshape(len(d.seqs), -1)
    decoded = set(d.seqs)
    rest = [(i, span) for i, span in enumerate(_spans(batch)) if i not in decoded]
    if rest:
        contexts = _Contexts(kc, vc, batch, once=False)  # not the decoded sequences' too
        for i, (start, qlen, ctx) in rest:
            out[start:start + qlen] = _sdpa(q[start:start + qlen], *contexts.get(i, ctx), scale)
    return out
