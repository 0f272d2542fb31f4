"""The split rule of docs/design.md §4, checked on the cases it names."""
from __future__ import annotations

import pytest

from netp.models import by_name
from netp.models.hparams import HParams
from netp.models.mapping import Mapping, SplitError


def hp(n_head, n_head_kv, n_embd=None, n_ff=1536, n_vocab=49152):
    n_embd = n_embd or 64 * n_head
    return HParams(arch="llama", n_vocab=n_vocab, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_layer=1,
                   n_ff=n_ff, n_rot=n_embd // n_head, norm_eps=1e-5, rope_theta=1e4, bos_token_id=1, eos_token_id=2)


def mappings(n_head, n_head_kv, world, **kw):
    h = hp(n_head, n_head_kv, **kw)
    return [Mapping(world, r, h, by_name("llama")) for r in range(world)]


@pytest.mark.parametrize("n_head,n_kv,world", [(9, 3, 2), (9, 3, 3), (4, 2, 3), (6, 1, 2), (8, 8, 4), (9, 3, 1)])
def test_heads_cover_and_kv_follow_queries(n_head, n_kv, world):
    ms = mappings(n_head, n_kv, world)
    q = [m.q_heads() for m in ms]
    # contiguous, covering, as even as possible
    assert q[0][0] == 0 and q[-1][1] == n_head
    assert all(a[1] == b[0] for a, b in zip(q, q[1:]))
    sizes = [b - a for a, b in q]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    group = n_head // n_kv
    for m, (h0, h1) in zip(ms, q):
        k0, k1 = m.kv_heads()
        assert {h // group for h in range(h0, h1)} == set(range(k0, k1))


def test_smollm2_over_two_ranks_shares_the_straddling_kv_head():
    a, b = mappings(9, 3, 2)
    assert (a.q_heads(), b.q_heads()) == ((0, 5), (5, 9))
    assert (a.kv_heads(), b.kv_heads()) == ((0, 2), (1, 3))
    assert a.slice_of("layers.0.attention.wk.weight", (192, 576)).stop == 128
    assert b.slice_of("layers.0.attention.wk.weight", (192, 576)).start == 64


def test_ffn_and_vocab_cut_on_blocks():
    ms = mappings(9, 3, 3, n_ff=1536, n_vocab=49152 + 8)
    for m in ms:
        a, b = m.ffn()
        assert a % 32 == 0 and (b % 32 == 0 or b == 1536)
    assert ms[-1].vocab()[1] == 49160
    assert sum(b - a for a, b in (m.vocab() for m in ms)) == 49160


def test_refusals():
    with pytest.raises(SplitError, match="more than"):
        mappings(4, 2, 5)
    with pytest.raises(SplitError):
        Mapping(0, 0, hp(4, 2), by_name("llama"))
    with pytest.raises(SplitError, match="MLP"):
        mappings(4, 2, 3, n_ff=64)
