"""The maths of recommend, classify, duplicates and clusters on vectors placed on purpose."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch_server import analysis


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def test_average_vector_query_is_the_normalised_weighted_difference() -> None:
    pos = unit(np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    neg = unit(np.array([[0, 0, 1.0]]))
    q = analysis.average_vector_query(pos, neg, 0.5)
    np.testing.assert_allclose(q, unit(np.array([0.5, 0.5, -0.5])), atol=1e-6)
    with pytest.raises(ValueError):
        analysis.average_vector_query(pos[:1], pos[:1], 1.0)  # cancels out


def test_best_scores_rank_winners_by_positive_and_losers_by_negative() -> None:
    pos = unit(np.array([[1.0, 0]]))
    neg = unit(np.array([[0, 1.0]]))
    cands = unit(np.array([[1.0, 0.1], [0.1, 1.0], [1.0, 0.9], [0.2, 1.0]]))
    scores = analysis.best_scores(cands, pos, neg)
    # winners keep their positive similarity; losers get -neg^2, below every winner
    assert scores[0] == pytest.approx(cands[0] @ pos[0])
    assert scores[1] == pytest.approx(-(cands[1] @ neg[0]) ** 2)
    assert list(np.argsort(-scores)) == [0, 2, 3, 1]


def test_zero_shot_probabilities_sum_to_one_and_follow_the_scale() -> None:
    rng = np.random.default_rng(0)
    images, labels = unit(rng.normal(size=(5, 16))), unit(rng.normal(size=(7, 16)))
    probs, sims = analysis.zero_shot_probabilities(images, labels, 100.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    expected = np.exp(100 * sims) / np.exp(100 * sims).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-9)


def test_label_embeddings_average_templates_per_label() -> None:
    prompts = unit(np.array([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0]]))  # label 0: two, label 1
    out = analysis.label_embeddings(prompts, 2, 2)
    np.testing.assert_allclose(out, unit(np.array([[1.0, 1.0], [1.0, 0]])), atol=1e-6)


def _placed(n: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, dim)))


def test_duplicate_groups_join_pairs_and_chains() -> None:
    v = _placed(50, 64, 1)
    v[10] = unit(v[3] + 0.05 * v[7])  # a near copy of 3
    v[20] = unit(v[30] + 0.1 * v[1])  # a chain: 20 ~ 30 ~ 40, but 20 !~ 40
    v[40] = unit(v[30] - 0.1 * v[1])
    sims = v @ v.T
    assert sims[20, 40] < 0.99 < min(sims[20, 30], sims[30, 40])
    neighbours = np.argsort(-sims, axis=1)[:, :5]
    groups = analysis.duplicate_groups(v, neighbours, np.take_along_axis(sims, neighbours, 1),
                                       0.99)
    assert [sorted(g.members) for g in groups] == [[20, 30, 40], [3, 10]]
    assert groups[0].members[0] == 30  # two qualifying pairs: the anchor
    assert groups[0].min_similarity == pytest.approx(min(sims[20, 30], sims[30, 40]), abs=1e-6)
    assert groups[0].scores[0] == 1.0
    assert groups[1].min_similarity == pytest.approx(sims[3, 10], abs=1e-6)
    assert analysis.duplicate_groups(v, neighbours,
                                     np.take_along_axis(sims, neighbours, 1), 1.0) == []


def test_kmeans_finds_three_blobs_and_numbers_them_by_size() -> None:
    rng = np.random.default_rng(2)
    centres = np.eye(32)[:3] * 10
    sizes = [12, 30, 20]
    v = unit(np.concatenate([c + rng.normal(size=(n, 32)) for c, n in zip(centres, sizes,
                                                                           strict=True)]))
    blob = np.repeat([0, 1, 2], sizes)
    result = analysis.kmeans(v, 3, seed=0)
    assert np.bincount(result.assignment).tolist() == [30, 20, 12]
    for b in range(3):  # each blob is exactly one cluster
        assert len(set(result.assignment[blob == b].tolist())) == 1
    central = analysis.most_central(v, result.assignment, result.centroids, 4)
    for c, (rows, scores) in enumerate(central):
        assert len(rows) == 4 and all(result.assignment[rows] == c)
        assert list(scores) == sorted(scores, reverse=True)
