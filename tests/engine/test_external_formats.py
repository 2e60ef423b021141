"""GPTQ / AWQ int32 layouts: hand-checked words, round trips, and exact conversion to int4."""

from __future__ import annotations

import re

import pytest
import torch

from engine.quant.external import (
    AWQ_ORDER,
    awq_dequantize,
    awq_pack,
    awq_unpack,
    gptq_dequantize,
    gptq_pack,
    gptq_unpack,
    group_index,
    is_act_order,
    pack_cols,
    pack_rows,
    to_int4,
    unpack_cols,
    unpack_rows,
)
from kernels.reference import dequantize_int4, num_groups


def _i32(u: int) -> int:
    """An unsigned 32-bit pattern as the signed int32 value torch stores."""
    return u - (1 << 32) if u >= 1 << 31 else u


def _words(*values: int) -> torch.Tensor:
    return torch.tensor([[_i32(v) for v in values]], dtype=torch.int32)


def _codes(gen: torch.Generator, shape: tuple[int, ...], top: int) -> torch.Tensor:
    return torch.randint(0, top + 1, shape, generator=gen, dtype=torch.int32)


def _fp16_scales(gen: torch.Generator, G: int, N: int) -> torch.Tensor:
    s = torch.rand(G, N, generator=gen) * 0.02 + 1e-4
    sign = torch.where(torch.rand(G, N, generator=gen) < 0.1, -1.0, 1.0)  # odd signs too
    return (s * sign).to(torch.float16)


# ---------------------------------------------------------------------------------------------
# Hand-checked words
# ---------------------------------------------------------------------------------------------


def test_gptq_4bit_word_by_hand():
    codes = torch.arange(8, dtype=torch.int32)[:, None]  # k = 0..7 in one column
    assert pack_rows(codes, 4).tolist() == [[0x76543210]]
    assert unpack_rows(_words(0x76543210), 4)[:, 0].tolist() == list(range(8))


def test_gptq_4bit_negative_word():
    # Top nibble 9 sets the sign bit: the int32 is negative and must not sign-extend.
    word = _words(0x9ABCDEF0)
    assert int(word) < 0
    assert unpack_rows(word, 4)[:, 0].tolist() == [0, 15, 14, 13, 12, 11, 10, 9]
    assert torch.equal(pack_rows(unpack_rows(word, 4), 4), word)


def test_gptq_8bit_words_by_hand():
    assert pack_rows(torch.tensor([[1], [2], [3], [4]]), 8).tolist() == [[0x04030201]]
    word = _words(0xFF80017F)
    assert int(word) < 0
    assert unpack_rows(word, 8)[:, 0].tolist() == [0x7F, 0x01, 0x80, 0xFF]
    assert torch.equal(pack_rows(unpack_rows(word, 8), 8), word)


def test_gptq_unpack_by_hand_and_v1_offset():
    # K = 8, N = 8, one group. Column n holds codes (k + n) % 16; qzeros stores 7 everywhere.
    q = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 16  # [K, N]
    qweight = pack_rows(q, 4)
    qzeros = _words(0x77777777)
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    g_idx = torch.zeros(8, dtype=torch.int32)

    qu, z1, s, g = gptq_unpack(qweight, qzeros, scales, g_idx, bits=4, zero_offset=1)
    assert torch.equal(qu, q.T.int())
    assert z1.tolist() == [[8] * 8]  # v1: stored 7 means z = 8
    assert s.dtype == torch.float32 and g.tolist() == [0] * 8
    _, z2, _, _ = gptq_unpack(qweight, qzeros, scales, g_idx, bits=4, zero_offset=0)
    assert z2.tolist() == [[7] * 8]

    w = gptq_dequantize(qweight, qzeros, scales, g_idx, bits=4, zero_offset=1)
    assert w[3, 2].item() == 0.5 * (5 - 8)  # n = 3, k = 2: code 5
    # Writing back with the same offset gives the same words.
    back = gptq_pack(qu, z1, s, g, bits=4, zero_offset=1)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], qzeros)
    assert back[2].dtype == torch.float16 and back[3].dtype == torch.int32


def test_awq_word_by_hand():
    # Nibbles in storage order a0..a7 = 1..8 (a7 = 8 makes the word negative).
    word = _words(0x87654321)
    assert int(word) < 0
    # Nibble i holds column ORDER[i]: columns 0, 2, 4, 6 get a0..a3, columns 1, 3, 5, 7 a4..a7.
    expected = [1, 5, 2, 6, 3, 7, 4, 8]
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert unpack_cols(word, 4, AWQ_ORDER)[0].tolist() == expected
    q, z, _ = awq_unpack(word, word, torch.ones(1, 8, dtype=torch.float16))
    assert q[:, 0].tolist() == expected and z[0].tolist() == expected  # q is [N, K=1]
    assert torch.equal(pack_cols(torch.tensor([expected]), 4, AWQ_ORDER), word)
    # Without an order, field i is column i.
    assert unpack_cols(word, 4)[0].tolist() == list(range(1, 9))


# ---------------------------------------------------------------------------------------------
# Against a literal element-by-element reading of the formats
# ---------------------------------------------------------------------------------------------


def _gptq_oracle(qweight, qzeros, scales, g_idx, bits, zero_offset):
    P, mask = 32 // bits, (1 << bits) - 1
    K, N = qweight.shape[0] * P, qweight.shape[1]
    w = torch.empty(N, K)
    for k in range(K):
        g = int(g_idx[k])
        for n in range(N):
            qv = (int(qweight[k // P, n]) >> (bits * (k % P))) & mask
            zv = ((int(qzeros[g, n // P]) >> (bits * (n % P))) & mask) + zero_offset
            w[n, k] = scales[g, n].float() * float(qv - zv)
    return w


def _awq_oracle(qweight, qzeros, scales, group_size):
    K, N = qweight.shape[0], qweight.shape[1] * 8
    where = {AWQ_ORDER[i]: i for i in range(8)}  # column within a block -> nibble
    w = torch.empty(N, K)
    for k in range(K):
        g = k // group_size
        for n in range(N):
            shift = 4 * where[n % 8]
            qv = (int(qweight[k, n // 8]) >> shift) & 15
            zv = (int(qzeros[g, n // 8]) >> shift) & 15
            w[n, k] = float(qv - zv) * scales[g, n].float()
    return w


def _random_words(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dequantize_matches_oracle(bits, act_order):
    gen = torch.Generator().manual_seed(bits + 10 * act_order)
    P, K, N, gs = 32 // bits, 24, 16, 8
    G = K // gs
    qweight = _random_words(gen, (K // P, N))
    qzeros = _random_words(gen, (G, N // P))
    scales = _fp16_scales(gen, G, N)
    g_idx = group_index(K, gs)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    g_idx = g_idx.int()
    for offset in (0, 1):
        got = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, offset)
        assert torch.equal(got, _gptq_oracle(qweight, qzeros, scales, g_idx, bits, offset))


@pytest.mark.parametrize("K", [5, 16])
def test_awq_dequantize_matches_oracle(K):
    gen = torch.Generator().manual_seed(K)
    N, gs = 16, 4
    G = num_groups(K, gs)
    qweight = _random_words(gen, (K, N // 8))
    qzeros = _random_words(gen, (G, N // 8))
    scales = _fp16_scales(gen, G, N)
    got = awq_dequantize(qweight, qzeros, scales, gs)
    assert torch.equal(got, _awq_oracle(qweight, qzeros, scales, gs))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("N", "K", "G"), [(8, 8, 1), (16, 64, 2), (24, 136, 5), (8, 32, 32)])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_gptq_round_trips(bits, N, K, G, zero_offset):
    gen = torch.Generator().manual_seed(N * K + G + bits + zero_offset)
    top = (1 << bits) - 1
    q = _codes(gen, (N, K), top)
    z = _codes(gen, (G, N), top) + zero_offset  # what the format can hold
    scales = _fp16_scales(gen, G, N)
    g_idx = torch.randint(0, G, (K,), generator=gen, dtype=torch.int32)

    packed = gptq_pack(q, z, scales, g_idx, bits, zero_offset)
    P = 32 // bits
    assert packed[0].shape == (K // P, N) and packed[1].shape == (G, N // P)
    q2, z2, s2, g2 = gptq_unpack(*packed, bits, zero_offset)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    assert torch.equal(s2, scales.float()) and torch.equal(g2, g_idx.long())

    # And words -> codes -> words, over the whole int32 range.
    qweight, qzeros = _random_words(gen, (K // P, N)), _random_words(gen, (G, N // P))
    again = gptq_pack(
        *gptq_unpack(qweight, qzeros, scales, g_idx, bits, zero_offset), bits, zero_offset
    )
    assert torch.equal(again[0], qweight) and torch.equal(again[1], qzeros)


@pytest.mark.parametrize(("N", "K", "G"), [(8, 1, 1), (16, 37, 2), (32, 128, 4)])
def test_awq_round_trips(N, K, G):
    gen = torch.Generator().manual_seed(N + K + G)
    q, z = _codes(gen, (N, K), 15), _codes(gen, (G, N), 15)
    scales = _fp16_scales(gen, G, N)
    qweight, qzeros, s16 = awq_pack(q, z, scales)
    assert qweight.shape == (K, N // 8) and qzeros.shape == (G, N // 8)
    q2, z2, s2 = awq_unpack(qweight, qzeros, s16)
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, scales.float())

    words = _random_words(gen, (K, N // 8))
    zwords = _random_words(gen, (G, N // 8))
    again = awq_pack(*awq_unpack(words, zwords, scales))
    assert torch.equal(again[0], words) and torch.equal(again[1], zwords)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_generic_helpers_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    P = 32 // bits
    v = _codes(gen, (3 * P, 2 * P), (1 << bits) - 1)
    assert torch.equal(unpack_rows(pack_rows(v, bits), bits), v)
    order = torch.randperm(P, generator=gen).tolist()
    assert torch.equal(unpack_cols(pack_cols(v, bits, order), bits, order), v)


# ---------------------------------------------------------------------------------------------
# Conversion to int4: bit-exact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("K", "gs"), [(96, 32), (200, 128), (256, 128), (64, 32)])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_gptq_to_int4_is_exact(K, gs, zero_offset):
    gen = torch.Generator().manual_seed(K + gs + zero_offset)
    N, G = 24, num_groups(K, gs)
    q = _codes(gen, (N, K), 15)
    z = _codes(gen, (G, N), 15) + zero_offset  # v1 reaches z = 16
    packed = gptq_pack(q, z, _fp16_scales(gen, G, N), group_index(K, gs), 4, zero_offset)
    expected = gptq_dequantize(*packed, 4, zero_offset)

    qu, zu, su, g = gptq_unpack(*packed, 4, zero_offset)
    t = to_int4(qu, zu, su, gs, g_idx=g)
    assert t["qweight"].dtype == torch.uint8 and t["qweight"].shape == (N, (K + 1) // 2)
    assert t["scales"].shape == t["zeros"].shape == (N, G)
    assert t["scales"].dtype == t["zeros"].dtype == torch.float32
    got = dequantize_int4(t["qweight"], t["scales"], t["zeros"], gs, K)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("K", "gs"), [(37, 32), (100, 32), (128, 128), (301, 128)])
def test_awq_to_int4_is_exact(K, gs):
    gen = torch.Generator().manual_seed(K + gs)
    N, G = 16, num_groups(K, gs)
    q, z = _codes(gen, (N, K), 15), _codes(gen, (G, N), 15)
    packed = awq_pack(q, z, _fp16_scales(gen, G, N))
    expected = awq_dequantize(*packed, gs)

    t = to_int4(*awq_unpack(*packed), gs)
    got = dequantize_int4(t["qweight"], t["scales"], t["zeros"], gs, K)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Act-order and bad input
# ---------------------------------------------------------------------------------------------


def test_act_order_is_detected_and_refused():
    K, gs = 64, 32
    plain = group_index(K, gs).int()
    assert not is_act_order(plain, gs)
    shuffled = plain[torch.randperm(K, generator=torch.Generator().manual_seed(0))]
    assert is_act_order(shuffled, gs)
    assert is_act_order(plain, 16)  # same tensor, other group size

    q = torch.zeros(8, K, dtype=torch.int32)
    z = torch.full((2, 8), 8, dtype=torch.int32)
    s = torch.ones(2, 8)
    assert set(to_int4(q, z, s, gs, g_idx=plain)) == {"qweight", "scales", "zeros"}
    with pytest.raises(ValueError, match="act-order"):
        to_int4(q, z, s, gs, g_idx=shuffled)


_W = torch.zeros(1, 8, dtype=torch.int32)  # one int32 row: K = 8 (4-bit GPTQ) or N = 64 (AWQ)
_S = torch.ones(1, 8, dtype=torch.float16)
_G = torch.zeros(8, dtype=torch.int32)
_Z = _S.int()  # [1, 8] zero points of 1
_Q = torch.zeros(8, 8, dtype=torch.int32)

BAD = {
    "gptq bits": (lambda: gptq_unpack(_W, _W[:, :1], _S, _G, 3, 0), "bits"),
    "gptq offset": (lambda: gptq_unpack(_W, _W[:, :1], _S, _G, 4, 2), "zero_offset"),
    "gptq dtype": (lambda: gptq_unpack(_W.long(), _W[:, :1], _S, _G, 4, 0), "int32"),
    "gptq qzeros width": (lambda: gptq_unpack(_W, _W, _S, _G, 4, 0), "qzeros"),
    "gptq scales shape": (lambda: gptq_unpack(_W, _W[:, :1], _S[:, :4], _G, 4, 0), "scales"),
    "gptq g_idx length": (lambda: gptq_unpack(_W, _W[:, :1], _S, _G[:4], 4, 0), "g_idx"),
    "gptq g_idx range": (lambda: gptq_unpack(_W, _W[:, :1], _S, _G + 1, 4, 0), "g_idx"),
    "gptq K % 8": (
        lambda: gptq_pack(torch.zeros(8, 10, dtype=torch.int32), _Z, _S, _G[:1].repeat(10), 4, 0),
        "multiple of 8",
    ),
    "gptq K % 4": (
        lambda: gptq_pack(torch.zeros(8, 6, dtype=torch.int32), _Z, _S, _G[:6], 8, 0),
        "multiple of 4",
    ),
    "gptq N % 8": (lambda: gptq_pack(_Q[:4], _Z[:, :4], _S[:, :4], _G, 4, 0), "N=4"),
    "gptq code range": (lambda: gptq_pack(_Q + 16, _Z, _S, _G, 4, 0), "0..15"),
    "gptq v1 z = 0": (lambda: gptq_pack(_Q, _Z * 0, _S, _G, 4, 1), "zero_offset"),
    "awq qzeros width": (lambda: awq_unpack(_W, _W[:, :1], _S), "qzeros"),
    "awq scales shape": (lambda: awq_unpack(_W[:, :1], _W[:, :1], _S[:, :4]), "scales"),
    "awq N % 8": (
        lambda: awq_pack(torch.zeros(12, 4, dtype=torch.int32), _Z[:, :1].repeat(1, 12), _S),
        "multiple of 8",
    ),
    "awq groups": (lambda: awq_dequantize(_W[:, :1].repeat(40, 1), _W[:, :1], _S, 32), "groups"),
    "int4 bits": (lambda: to_int4(_Q, _Z, _S, 8, bits=8), "4-bit"),
    "int4 groups": (lambda: to_int4(_Q, _Z, _S, 4), "shape"),
    "int4 z > 16": (lambda: to_int4(_Q, _Z * 17, _S, 8), "0..16"),
    "int4 float codes": (lambda: to_int4(_Q.float(), _Z, _S, 8), "integer"),
    "int4 group size": (lambda: to_int4(_Q, _Z, _S, -1), "group_size"),
    "helper bits": (lambda: unpack_rows(_W, 3), "bits"),
    "helper order": (lambda: unpack_cols(_W, 4, [0, 1, 2, 3, 4, 5, 6, 6]), "permutation"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
