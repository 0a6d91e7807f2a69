"""The offline evaluation's peers: each fitted on a tiny case with a known answer."""

from __future__ import annotations

import pytest

from recsys.eval import peers

# Items 0-1-2 are a block everyone in group A takes; 3-4-5 group B; item 6 is only popular.
ROWS = [[0, 1, 2, 6]] * 6 + [[3, 4, 5, 6]] * 6 + [[6]] * 4


def test_most_popular_and_knn() -> None:
    pop = peers.MostPopular().fit(ROWS, 8)([0], [[0]])
    assert pop[0].argmax().item() == 6
    knn = peers.ItemKNN().fit(ROWS, 8)([0], [[0]])[0]
    assert knn[1] > knn[3]  # co-occurs with 0, the other block does not
    assert knn[0] == 0  # no self-similarity


def test_ease_recovers_the_blocks() -> None:
    s = peers.EASE().fit(ROWS, 8, lam=1.0)([0, 1], [[0, 1], [3, 4]])
    assert s[0, 2] > s[0, 5]
    assert s[1, 5] > s[1, 2]
    assert s[0, 7] < -1e8  # never seen in training: ranked last


@pytest.mark.parametrize("algo", ["als", "bpr"])
def test_implicit_mf_ranks_the_users_block_first(algo: str) -> None:
    model = peers.ImplicitMF(algo, seed=0)
    params = dict(model.grid[-1], factors=8)
    rows = [[0, 1]] + [[0, 1, 2]] * 8 + [[3, 4]] + [[3, 4, 5]] * 8
    scorer = model.fit(rows, 8, **params)
    s = scorer([0, 9], [[0, 1], [3, 4]])
    # user 0 (block A, has not taken item 2) prefers item 2 over item 5; user 9 the reverse
    assert s[0, 2] > s[0, 5]
    assert s[1, 5] > s[1, 2]


def test_sequence_chunks_cover_each_item_once() -> None:
    c = peers.sequence_chunks([[1, 2, 3, 4, 5], [7]], 3)
    assert c.tolist() == [[3, 4, 5], [-1, 1, 2], [-1, -1, 7]]


def test_sasrec_learns_a_cycle() -> None:
    seqs = [[(u + t) % 6 for t in range(12)] for u in range(20)]
    rec = peers.SASRec(6, dim=16, max_len=4, layers=1, heads=1, dropout=0.0, lr=5e-3,
                       batch_size=32, num_negatives=6, seed=0)  # fmt: skip
    chunks = peers.sequence_chunks(seqs, 5)
    losses = [rec.step(chunks) for _ in range(200)]
    assert sum(losses[-10:]) < sum(losses[:10])
    s = rec.scores([[1, 2, 3], [4, 5]])
    assert s[0].argmax().item() == 4
    assert s[1].argmax().item() == 0
