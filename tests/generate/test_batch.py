"""Decode-step packing (pure): left-padded caches, the additive mask, own positions, unpacking."""

from __future__ import annotations

import torch

from loraflight.engine.generate.batch import cache_length, decode_mask, pack, unpack


def kv(length, fill, layers=2, heads=2, dim=3):
    return tuple(
        (torch.full((1, heads, length, dim), fill + li), torch.full((1, heads, length, dim), -fill - li))
        for li in range(layers)
    )


def test_mask_attends_each_rows_own_keys_and_its_new_token():
    m = decode_mask([3, 1, 2], torch.float32)
    assert m.shape == (3, 1, 1, 4)
    low = torch.finfo(torch.float32).min
    assert m[:, 0, 0].tolist() == [[0, 0, 0, 0], [low, low, 0, 0], [low, 0, 0, 0]]


def test_pack_left_pads_and_gives_own_positions():
    caches = [kv(3, 1.0), kv(1, 10.0)]
    p = pack(caches, [7, 9])
    assert p.input_ids.tolist() == [[7], [9]]
    assert p.position_ids.tolist() == [[3], [1]]
    assert p.width == 3 and p.lengths == (3, 1)
    k0, v0 = p.layers[0]
    assert k0.shape == (2, 2, 3, 3)
    assert torch.equal(k0[0], caches[0][0][0][0])
    assert torch.all(k0[1, :, :2] == 0) and torch.all(k0[1, :, 2] == 10.0)
    assert torch.all(v0[1, :, 2] == -10.0)


def test_unpack_cuts_each_row_back_with_its_new_key():
    caches = [kv(3, 1.0), kv(1, 10.0)]
    p = pack(caches, [7, 9])
    new_k = torch.full((2, 2, 1, 3), 99.0)
    grown = [(torch.cat([k, new_k], 2), torch.cat([v, -new_k], 2)) for k, v in p.layers]
    back = unpack(grown, p.lengths)
    assert [cache_length(c) for c in back] == [4, 2]
    for c, orig in zip(back, caches, strict=True):
        for (k, v), (k0, v0) in zip(c, orig, strict=True):
            n = k0.shape[2]
            assert torch.equal(k[:, :, :n], k0) and torch.equal(v[:, :, :n], v0)
            assert torch.all(k[:, :, n] == 99.0)
