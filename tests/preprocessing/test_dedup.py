"""Near-dedup against brute force on real text with planted near-duplicates."""

import itertools

import numpy as np
import pytest

from preprocessing.dedup import (
    NearDuplicateIndex,
    UnionFind,
    as32,
    jaccard,
    minhash,
    shingle_hashes,
)
from tests.conftest import mutate


def test_shingles_ignore_case_spacing_and_punctuation():
    a = shingle_hashes("The quick brown fox jumps over the lazy dog.")
    b = shingle_hashes("the  QUICK brown\nfox -- jumps over the lazy dog")
    assert a.size == 5 and np.array_equal(a, b)
    assert not np.array_equal(a, shingle_hashes("the quick brown fox jumps over the lazy cat"))
    assert shingle_hashes("two words").size == 1 and shingle_hashes("...").size == 0
    # non-ASCII words hash by their UTF-8 bytes, consistently
    assert np.array_equal(shingle_hashes("über straße café naïve fjörd x"),
                          shingle_hashes("ÜBER STRASSE café naïve fjörd x".replace("SS", "ß")))


def _brute_force_sets(docs):
    """Independent reference: Python sets of word 5-gram tuples."""
    out = []
    for d in docs:
        w = "".join(c if c.isalnum() or c == "_" else " " for c in d.lower()).split()
        out.append({tuple(w[i:i + 5]) for i in range(max(len(w) - 4, 1))})
    return out


def test_exact_jaccard_matches_python_sets(stdlib_docs):
    docs = [stdlib_docs[0], mutate(stdlib_docs[0], 0.03, 1), mutate(stdlib_docs[0], 0.2, 2)]
    ours = [as32(shingle_hashes(d)) for d in docs]
    ref = _brute_force_sets(docs)
    for i, j in itertools.combinations(range(3), 2):
        expected = len(ref[i] & ref[j]) / len(ref[i] | ref[j])
        assert abs(jaccard(ours[i], ours[j]) - expected) < 1e-9


def test_minhash_estimates_jaccard(stdlib_docs):
    errors = []
    for k, doc in enumerate(stdlib_docs[:60]):
        other = mutate(doc, 0.05 + 0.3 * (k % 5) / 4, k)
        x, y = shingle_hashes(doc), shingle_hashes(other)
        errors.append((minhash(x) == minhash(y)).mean() - jaccard(np.unique(x), np.unique(y)))
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.02, "estimator is biased"
    assert errors.std() < 0.06  # theory: sqrt(J(1-J)/128) <= 0.044


def test_union_find_keeps_first_and_merges_chains():
    uf = UnionFind()
    for _ in range(5):
        uf.add()
    uf.union(3, 4)
    uf.union(1, 3)
    assert {uf.find(i) for i in (1, 3, 4)} == {1} and uf.find(0) == 0 and uf.find(2) == 2


def test_chains_form_one_cluster(stdlib_docs):
    words = " ".join(stdlib_docs[3:6]).split()
    assert len(words) >= 400
    # sliding windows: a~b and b~c (J = 0.76), but a and c are not near (J = 0.57)
    a, b, c = (" ".join(words[s:s + 300]) for s in (0, 40, 80))
    sets = [as32(shingle_hashes(t)) for t in (a, b, c)]
    assert jaccard(sets[0], sets[1]) >= 0.7 and jaccard(sets[1], sets[2]) >= 0.7
    assert jaccard(sets[0], sets[2]) < 0.7
    index = NearDuplicateIndex(0.7)
    for t in (a, b, c):
        sh = shingle_hashes(t)
        index.add(minhash(sh), as32(sh))
    assert index.clusters() == {0: [1, 2]}


@pytest.fixture(scope="module")
def planted(stdlib_docs):
    """Originals, then exact copies, 1-3 % mutations and >= 40 % 'far' variants."""
    originals = stdlib_docs[:150]
    docs, kind = list(originals), ["original"] * len(originals)
    for k, doc in enumerate(originals[:100]):
        docs.append(doc if k % 4 == 0 else mutate(doc, 0.01 + 0.02 * (k % 3) / 2, k))
        kind.append("near")
    for k, doc in enumerate(originals[100:150]):
        docs.append(mutate(doc, 0.4 + 0.2 * (k % 2), 1000 + k))
        kind.append("far")
    return docs, kind


def test_recall_against_brute_force(planted):
    docs, kind = planted
    shingles = [shingle_hashes(d) for d in docs]
    index = NearDuplicateIndex(0.7)
    for sh in shingles:
        index.add(minhash(sh), as32(sh))

    ref = _brute_force_sets(docs)
    truth = {(i, j) for i, j in itertools.combinations(range(len(docs)), 2)
             if len(ref[i] & ref[j]) / len(ref[i] | ref[j]) >= 0.7}
    clusters = {doc: root for root, members in index.clusters().items() for doc in members}
    root = [clusters.get(i, i) for i in range(len(docs))]
    found = {(i, j) for i, j in truth if root[i] == root[j]}
    recall = len(found) / len(truth)
    planted_pairs = [(i, j) for i, j in truth if kind[j] == "near"]
    print(f"brute-force pairs >= 0.7: {len(truth)}, recall {recall:.4f}, "
          f"planted near pairs {len(planted_pairs)}, LSH candidates {index.candidates}")
    assert len(planted_pairs) >= 95  # every planted near-duplicate is >= 0.7 by brute force
    assert recall >= 0.98
    removed = {d for members in index.clusters().values() for d in members}
    assert not any(kind[d] == "far" for d in removed), "a far variant was removed"
    assert all(kind[d] == "near" or kind[d] == "original" for d in removed)
    # precision: everything merged is connected by brute-force pairs (exact check)
    for d in removed:
        assert any((min(d, o), max(d, o)) in truth for o in range(len(docs))
                   if o != d and root[o] == root[d])
