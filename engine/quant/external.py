"""Read and write the GPTQ, AWQ and compressed-tensors int32-packed layouts, and convert them
to our int4 / group-wise int8 storage.

Both third-party formats store the weight transposed, [K, N] (K input features, N output
features), with several low-bit codes in each int32, lowest bits first (P = 32 // bits a word):

- GPTQ (AutoGPTQ / GPTQModel), 4 or 8 bits: qweight int32 [K / P, N] packed along K, qzeros
  int32 [G, N / P] packed along N, scales float16 [G, N], g_idx int32 [K] (the group of each
  input column; not k // group_size after act-order / desc_act).
  W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]).
  The "gptq" (v1) checkpoint format keeps z - 1 in qzeros, "gptq_v2" keeps z: `zero_offset` is
  1 or 0 accordingly.
- AWQ (AutoAWQ GEMM), 4 bits: qweight int32 [K, N / 8] and qzeros int32 [G, N / 8], both packed
  along N, the nibble at shift 4 * i of word j holding column 8 * j + AWQ_ORDER[i]; scales
  float16 [G, N]; contiguous groups.  W[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n].

- compressed-tensors "pack-quantized" (llm-compressor), 4 or 8 bits: weight_packed int32
  [N, ceil(K * bits / 32)] packed along K (our orientation), weight_scale [N, G], for
  asymmetric schemes weight_zero_point int32 [ceil(N * bits / 32), G] packed along N,
  weight_shape [N, K], weight_g_idx [K] with act-order; codes and zero points are stored plus
  2**(bits - 1) (signed values made unsigned).  W[n, k] = (q[n, k] - z[n, g]) * scale[n, g]
  (symmetric: z = 2**(bits - 1)); a "channel" scheme has G = 1.

Unpacked, codes are q int32 [N, K] (our orientation), zero points z int32 [G, N] and scales
float32 [G, N] (the formats' orientation).  Everything here is plain torch on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.reference import num_groups, pack_nibbles

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
"""Column (within a block of 8) held by the nibble at shift 4 * i of an AWQ word."""

GPTQ_BITS = (4, 8)

# ---------------------------------------------------------------------------------------------
# Bit fields in int32 words
# ---------------------------------------------------------------------------------------------


def _per_word(bits: int) -> int:
    """P = 32 // bits, the number of fields in one int32."""
    if not 0 < bits < 32 or 32 % bits:
        raise ValueError(f"bits must divide 32 (1, 2, 4, 8 or 16), got {bits}")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(_per_word(bits), device=device, dtype=torch.int64) * bits


def _check_words(t: Tensor, name: str) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_codes(t: Tensor, bits: int, name: str, top: int | None = None) -> None:
    """t must be a 2-D integer tensor with values 0..top (default 2**bits - 1)."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    top = (1 << bits) - 1 if top is None else top
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > top):
        raise ValueError(f"{name} must lie in 0..{top}, found {int(t.min())}..{int(t.max())}")


def _unsigned(words: Tensor) -> Tensor:
    """int32 words as int64 0 .. 2**32 - 1, the same bits read unsigned (no sign extension)."""
    return words.to(torch.int64) & 0xFFFFFFFF


def _to_words(acc: Tensor) -> Tensor:
    """int64 0 .. 2**32 - 1 -> int32 with the same bit pattern (two's complement)."""
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def _order(order: Sequence[int] | None, p: int, device: torch.device) -> Tensor:
    if order is None:
        return torch.arange(p, device=device)
    if sorted(order) != list(range(p)):
        raise ValueError(f"order must be a permutation of 0..{p - 1}, got {list(order)}")
    return torch.tensor(list(order), device=device, dtype=torch.int64)


def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """int32 [R, C] -> int32 [R * P, C], P = 32 // bits.

    out[r * P + i, c] is field i (at shift bits * i) of words[r, c]; the inverse of pack_rows.
    """
    p = _per_word(bits)
    _check_words(words, "packed tensor")
    shifts = _shifts(bits, words.device)[None, :, None]
    fields = (_unsigned(words)[:, None, :] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(words.shape[0] * p, words.shape[1]).to(torch.int32)


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Inverse of unpack_rows: integer [R, C] codes 0 .. 2**bits - 1, R a multiple of P -> int32."""
    p = _per_word(bits)
    _check_codes(values, bits, "values")
    rows, cols = values.shape
    if rows % p:
        raise ValueError(f"{rows} rows cannot be packed {p} per int32 at {bits} bits")
    v = values.to(torch.int64).reshape(rows // p, p, cols)
    return _to_words((v << _shifts(bits, values.device)[None, :, None]).sum(dim=1))


def unpack_cols(words: Tensor, bits: int, order: Sequence[int] | None = None) -> Tensor:
    """int32 [R, C] -> int32 [R, C * P]: field i of words[r, j] lands in column j * P + order[i].

    `order` is a permutation of 0..P-1; None means the identity (field i -> column j * P + i).
    """
    p = _per_word(bits)
    _check_words(words, "packed tensor")
    perm = _order(order, p, words.device)
    fields = (_unsigned(words)[:, :, None] >> _shifts(bits, words.device)) & ((1 << bits) - 1)
    # fields[r, j, i] belongs at column order[i]: gather with the inverse permutation.
    out = fields[:, :, torch.argsort(perm)]
    return out.reshape(words.shape[0], words.shape[1] * p).to(torch.int32)


def pack_cols(values: Tensor, bits: int, order: Sequence[int] | None = None) -> Tensor:
    """Inverse of unpack_cols: integer [R, C] codes, C a multiple of P -> int32 [R, C / P]."""
    p = _per_word(bits)
    _check_codes(values, bits, "values")
    rows, cols = values.shape
    if cols % p:
        raise ValueError(f"{cols} columns cannot be packed {p} per int32 at {bits} bits")
    perm = _order(order, p, values.device)
    v = values.to(torch.int64).reshape(rows, cols // p, p)[:, :, perm]
    return _to_words((v << _shifts(bits, values.device)).sum(dim=2))


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------


def _check_group_size(group_size: int) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive (K for one group a row), got {group_size}")


def group_index(K: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """int64 [K] with k // group_size: contiguous groups (pass group_size=K for GPTQ's -1)."""
    _check_group_size(group_size)
    return torch.arange(K, device=device, dtype=torch.int64) // group_size


def is_act_order(g_idx: Tensor, group_size: int) -> bool:
    """True when g_idx is not k // group_size (act-order / desc_act reordered the groups)."""
    g = g_idx.to(torch.int64).reshape(-1)
    return not torch.equal(g, group_index(g.numel(), group_size, g.device))


def _check_scales(scales: Tensor, G: int, N: int) -> None:
    if not scales.is_floating_point():
        raise ValueError(f"scales must be floating point, got {scales.dtype}")
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"scales must have shape [G, N] = {[G, N]}, got {list(scales.shape)}")


def _check_g_idx(g_idx: Tensor, K: int, G: int) -> Tensor:
    """Validate g_idx [K] with values in 0..G-1; return it as int64."""
    if g_idx.is_floating_point() or g_idx.dtype == torch.bool:
        raise ValueError(f"g_idx must be an integer tensor, got {g_idx.dtype}")
    if tuple(g_idx.shape) != (K,):
        raise ValueError(f"g_idx must have shape [K] = [{K}], got {list(g_idx.shape)}")
    if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise ValueError(
            f"g_idx values must lie in 0..{G - 1}, found {int(g_idx.min())}..{int(g_idx.max())}"
        )
    return g_idx.to(torch.int64)


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------


def _check_gptq_args(bits: int, zero_offset: int) -> int:
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits}")
    if zero_offset not in (0, 1):
        raise ValueError(f"zero_offset must be 1 (gptq v1) or 0 (gptq_v2), got {zero_offset}")
    return 32 // bits


def gptq_unpack(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, zero_offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GPTQ tensors -> (q int32 [N, K], z int32 [G, N], scales float32 [G, N], g_idx int64 [K]).

    z is the real zero point: the stored value plus `zero_offset` (1 for v1, 0 for v2).
    """
    p = _check_gptq_args(bits, zero_offset)
    _check_words(qweight, "qweight")
    _check_words(qzeros, "qzeros")
    K, N = qweight.shape[0] * p, qweight.shape[1]
    G = qzeros.shape[0]
    if qzeros.shape[1] * p != N:
        raise ValueError(
            f"qzeros has {qzeros.shape[1]} columns, {qzeros.shape[1] * p} zero points at {bits} "
            f"bits, but qweight has N={N} columns"
        )
    _check_scales(scales, G, N)
    g = _check_g_idx(g_idx, K, G)
    q = unpack_rows(qweight, bits).T.contiguous()
    z = unpack_cols(qzeros, bits) + zero_offset
    return q, z, scales.float(), g


def gptq_pack(
    q: Tensor, z: Tensor, scales: Tensor, g_idx: Tensor, bits: int, zero_offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of gptq_unpack -> (qweight int32, qzeros int32, scales float16, g_idx int32).

    q [N, K] with K a multiple of P = 32 // bits, z [G, N] with N a multiple of P, scales [G, N],
    g_idx [K].  Stores z - zero_offset, so v1 cannot hold z = 0.
    """
    p = _check_gptq_args(bits, zero_offset)
    _check_codes(q, bits, "q")
    N, K = q.shape
    if K % p:
        raise ValueError(f"GPTQ packs K along qweight's rows: K={K} is not a multiple of {p}")
    if N % p:
        raise ValueError(f"GPTQ packs N along qzeros' columns: N={N} is not a multiple of {p}")
    if z.dim() != 2 or z.shape[1] != N:
        raise ValueError(f"z must have shape [G, N={N}], got {list(z.shape)}")
    G = z.shape[0]
    _check_scales(scales, G, N)
    g = _check_g_idx(g_idx, K, G)
    _check_codes(z - zero_offset, bits, f"z - zero_offset (zero_offset={zero_offset})")
    qweight = pack_rows(q.T, bits)
    qzeros = pack_cols(z - zero_offset, bits)
    return qweight, qzeros, scales.to(torch.float16), g.to(torch.int32)


def gptq_dequantize(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, zero_offset: int
) -> Tensor:
    """GPTQ tensors -> float32 [N, K]: scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])."""
    q, z, s, g = gptq_unpack(qweight, qzeros, scales, g_idx, bits, zero_offset)
    return (s[g].T * (q - z[g].T).float()).contiguous()


# ---------------------------------------------------------------------------------------------
# AWQ
# ---------------------------------------------------------------------------------------------


def awq_unpack(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AWQ GEMM tensors -> (q int32 [N, K], z int32 [G, N], scales float32 [G, N])."""
    _check_words(qweight, "qweight")
    _check_words(qzeros, "qzeros")
    N = qweight.shape[1] * 8
    if qzeros.shape[1] * 8 != N:
        raise ValueError(
            f"qzeros has {qzeros.shape[1]} columns ({qzeros.shape[1] * 8} zero points) but "
            f"qweight holds N={N} columns"
        )
    _check_scales(scales, qzeros.shape[0], N)
    q = unpack_cols(qweight, 4, AWQ_ORDER).T.contiguous()
    z = unpack_cols(qzeros, 4, AWQ_ORDER)
    return q, z, scales.float()


def awq_pack(q: Tensor, z: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of awq_unpack: q [N, K], z [G, N], scales [G, N] with N a multiple of 8
    -> (qweight int32 [K, N / 8], qzeros int32 [G, N / 8], scales float16 [G, N])."""
    _check_codes(q, 4, "q")
    N = q.shape[0]
    if N % 8:
        raise ValueError(f"AWQ packs 8 output features per int32: N={N} is not a multiple of 8")
    _check_codes(z, 4, "z")
    if z.shape[1] != N:
        raise ValueError(f"z must have shape [G, N={N}], got {list(z.shape)}")
    _check_scales(scales, z.shape[0], N)
    return pack_cols(q.T, 4, AWQ_ORDER), pack_cols(z, 4, AWQ_ORDER), scales.to(torch.float16)


def awq_dequantize(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """AWQ GEMM tensors -> float32 [N, K]: (q[k, n] - z[k // g, n]) * scales[k // g, n]."""
    q, z, s = awq_unpack(qweight, qzeros, scales)
    K = q.shape[1]
    _check_group_size(group_size)
    if z.shape[0] != num_groups(K, group_size):
        raise ValueError(
            f"{z.shape[0]} groups stored, but K={K} with group size {group_size} needs "
            f"{num_groups(K, group_size)}"
        )
    g = group_index(K, group_size, q.device)
    return ((q - z[g].T).float() * s[g].T).contiguous()


# ---------------------------------------------------------------------------------------------
# Conversion to our int4 storage
# ---------------------------------------------------------------------------------------------


def act_order_permutation(g_idx: Tensor, group_size: int) -> Tensor:
    """For an act-order g_idx [K]: the input order `perm` (int64 [K]) in which the groups are
    contiguous, g_idx[perm] == k // group_size. A layer stored with its columns in that order
    computes y = x[..., perm] @ W[:, perm].T, the same sum as x @ W.T.

    Raises ValueError unless every group but the last holds exactly `group_size` columns (what
    GPTQ's act-order writes: g_idx[perm_H[i]] = i // group_size for its Hessian order perm_H).
    """
    _check_group_size(group_size)
    K = g_idx.numel()
    g = _check_g_idx(g_idx.reshape(-1), K, num_groups(K, group_size))
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], group_index(K, group_size, g.device)):
        counts = torch.bincount(g, minlength=num_groups(K, group_size)).tolist()
        raise ValueError(f"g_idx groups hold {counts} columns; act-order needs {group_size} each "
                         f"(the last may be shorter)")
    return perm


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ---------------------------------------------------------------------------------------------


def ct_unpack(packed: Tensor, shape: Sequence[int], scale: Tensor, zero_point: Tensor | None,
              bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """compressed-tensors tensors -> (q int32 [N, K], z int32 [G, N], scales float32 [G, N]),
    unsigned: z is 2**(bits - 1) everywhere for a symmetric scheme (no zero_point)."""
    p = _per_word(bits)
    _check_words(packed, "weight_packed")
    N, K = (int(d) for d in shape)
    if tuple(packed.shape) != (N, -(-K // p)):
        raise ValueError(f"weight_packed has shape {list(packed.shape)}, expected "
                         f"{[N, -(-K // p)]} for a {N}x{K} weight at {bits} bits")
    if scale.dim() != 2 or scale.shape[0] != N:
        raise ValueError(f"weight_scale must have shape [N={N}, G], got {list(scale.shape)}")
    G = scale.shape[1]
    q = unpack_cols(packed, bits)[:, :K]
    if zero_point is None:
        z = torch.full((G, N), 1 << (bits - 1), dtype=torch.int32, device=packed.device)
    else:
        _check_words(zero_point, "weight_zero_point")
        if tuple(zero_point.shape) != (-(-N // p), G):
            raise ValueError(f"weight_zero_point has shape {list(zero_point.shape)}, expected "
                             f"{[-(-N // p), G]} (packed along N)")
        z = unpack_cols(zero_point.T.contiguous(), bits)[:, :N]
    return q.contiguous(), z.contiguous(), scale.float().T.contiguous()


def ct_pack(q: Tensor, z: Tensor | None, bits: int) -> tuple[Tensor, Tensor | None]:
    """Inverse of ct_unpack's codes: q [N, K] and z [G, N] (unsigned; None when symmetric) ->
    (weight_packed, weight_zero_point), padding a partial last word with zeros."""
    p = _per_word(bits)

    def pack(v: Tensor) -> Tensor:
        pad = -v.shape[1] % p
        return pack_cols(torch.nn.functional.pad(v, (0, pad)) if pad else v, bits)

    return pack(q), None if z is None else pack(z).T.contiguous()


def to_int4(q: Tensor, z: Tensor, scales: Tensor, group_size: int, *,
            g_idx: Tensor | None = None, bits: int = 4) -> dict[str, Tensor]:
    """to_stored for 4-bit codes only (our int4 storage)."""
    if bits != 4:
        raise ValueError(f"our int4 storage holds 4-bit codes only, got bits={bits}")
    return to_stored(q, z, scales, group_size, g_idx=g_idx, bits=4)


def to_stored(
    q: Tensor,
    z: Tensor,
    scales: Tensor,
    group_size: int,
    *,
    g_idx: Tensor | None = None,
    bits: int = 4,
) -> dict[str, Tensor]:
    """Unpacked GPTQ / AWQ weights -> our stored tensors {qweight, scales, zeros}: int4 for
    4-bit codes, group-wise int8 (int8g) for 8-bit ones.

    q int [N, K] codes 0..2**bits - 1, z int [G, N] zero points 0..2**bits (the top value
    arises from v1's offset), scales [G, N], contiguous groups of `group_size` along K (the
    last one may be shorter; permute act-order columns first, see act_order_permutation).
    Returns scales and zeros float32 [N, G] with zeros = (c - z) * scale for the format's
    middle code c (8 or 128), so (q - c) * scale + zeros == (q - z) * scale; qweight is uint8
    [N, ceil(K/2)] nibble-packed (int4) or [N, K] (int8g).

    Exact in float32 when the scales are float16 (or bfloat16) values: a float16 significand
    has 11 bits, and times an integer of magnitude at most 2**bits it needs at most 11 + 9,
    inside float32's 24; so (q - c) * s and (c - z) * s are exact, and their sum (q - z) * s is
    also representable, hence exact after rounding.  Arbitrary float32 scales can lose that.
    """
    if bits not in (4, 8):
        raise ValueError(f"nibble stores 4-bit (int4) and 8-bit (int8g) codes, got bits={bits}")
    _check_codes(q, bits, "q")
    N, K = q.shape
    _check_group_size(group_size)
    G = num_groups(K, group_size)
    if g_idx is not None and is_act_order(_check_g_idx(g_idx, K, G), group_size):
        raise ValueError(
            "g_idx is not k // group_size (act-order / desc_act): its groups are not "
            "contiguous along K; permute the columns first (act_order_permutation)"
        )
    _check_codes(z, bits, "z", top=1 << bits)
    if tuple(z.shape) != (G, N):
        raise ValueError(
            f"z must have shape [G, N] = {[G, N]} for K={K} and group size {group_size}, "
            f"got {list(z.shape)}"
        )
    _check_scales(scales, G, N)
    s = scales.float()
    middle = 1 << (bits - 1)
    zeros = (middle - z).float() * s
    codes = q.to(torch.uint8)
    return {
        "qweight": pack_nibbles(codes) if bits == 4 else codes.contiguous(),
        "scales": s.T.contiguous(),
        "zeros": zeros.T.contiguous(),
    }
