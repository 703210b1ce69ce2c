"""The tree math (topic_audit.transparency.tlog) checked against code that did not make it.

Every proof of trees of 1 to 70 leaves is verified by an independent implementation of RFC 9162's
verification algorithms (tests/tlog_reference.py) and by ours; roots are compared with pymerkle's
RFC 9162 tree (``InmemoryTree('sha256')``: leaf ``SHA-256(0x00 || data)``, node ``SHA-256(0x01 || l ||
r)``, as its hasher's security prefixes make them).
"""

from __future__ import annotations

import hashlib

import pytest
import tlog_reference as reference
from pymerkle import InmemoryTree
from topic_audit.transparency import tlog

SIZES = range(1, 71)
DATA = [hashlib.sha256(str(i).encode()).digest() for i in range(70)]
LEAVES = [tlog.leaf_hash(d) for d in DATA]


@pytest.fixture(scope="module")
def memory() -> tlog.MemoryTree:
    return tlog.MemoryTree(LEAVES)


def test_hashes_are_rfc_9162() -> None:
    assert tlog.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert tlog.node_hash(b"l", b"r") == hashlib.sha256(b"\x01lr").digest()
    assert tlog.root(tlog.MemoryTree(), 0) == hashlib.sha256(b"").digest()


def test_roots_match_pymerkle_and_the_reference(memory: tlog.MemoryTree) -> None:
    theirs = InmemoryTree("sha256")
    frontier = tlog.Frontier()
    for n, data in enumerate(DATA, 1):
        theirs.append_entry(data)
        frontier.push(tlog.leaf_hash(data))
        ours = tlog.root(memory, n)
        assert ours == theirs.get_root(n) == reference.root_from_leaves(DATA[:n]), n
        assert frontier.root() == ours, n


def test_the_frontier_takes_leaves_and_whole_blocks() -> None:
    leaves = [tlog.leaf_hash(i.to_bytes(4, "big")) for i in range(1300)]
    memory = tlog.MemoryTree(leaves)
    for split in (0, 1, 255, 256, 257, 700):
        frontier = tlog.Frontier()
        frontier.extend(leaves[:split])
        assert frontier.root() == tlog.root(memory, split)
        frontier.extend(leaves[split:])
        assert frontier.root() == tlog.root(memory, 1300), split
    with pytest.raises(ValueError, match="cannot follow"):
        frontier.push(leaves[0], 8)


@pytest.mark.parametrize("size", SIZES)
def test_every_inclusion_proof_verifies_independently(memory: tlog.MemoryTree, size: int) -> None:
    root = tlog.root(memory, size)
    for index in range(size):
        proof = tlog.inclusion_proof(memory, index, size)
        assert reference.verify_inclusion(DATA[index], index, size, proof, root), (index, size)
        assert tlog.verify_inclusion(LEAVES[index], index, size, proof, root)
        assert len(proof) <= (size - 1).bit_length()


@pytest.mark.parametrize("new", SIZES)
def test_every_consistency_proof_verifies_independently(memory: tlog.MemoryTree, new: int) -> None:
    new_root = tlog.root(memory, new)
    for old in range(1, new + 1):
        proof = tlog.consistency_proof(memory, old, new)
        old_root = tlog.root(memory, old)
        if old < new:
            assert reference.verify_consistency(old, new, old_root, new_root, proof), (old, new)
        else:
            assert proof == []
        assert tlog.verify_consistency(old, new, old_root, new_root, proof), (old, new)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 31, 64, 70])
def test_a_changed_proof_leaf_index_or_root_fails(memory: tlog.MemoryTree, size: int) -> None:
    root = tlog.root(memory, size)
    for index in range(size):
        proof = tlog.inclusion_proof(memory, index, size)
        other = LEAVES[(index + 1) % 70]
        assert not tlog.verify_inclusion(other, index, size, proof, root)
        assert not tlog.verify_inclusion(LEAVES[index], index, size, proof, tlog.leaf_hash(b"not the root"))
        assert not tlog.verify_inclusion(
            LEAVES[index], index, size, [*proof, proof[0] if proof else root], root
        )
        if size > 1:
            assert not tlog.verify_inclusion(LEAVES[index], (index + 1) % size, size, proof, root)
            forged = [bytes(32), *proof[1:]]
            assert not tlog.verify_inclusion(LEAVES[index], index, size, forged, root)
            assert not reference.verify_inclusion(DATA[index], index, size, forged, root)


@pytest.mark.parametrize(("old", "new"), [(1, 2), (3, 7), (4, 8), (6, 70), (32, 64), (63, 64), (69, 70)])
def test_a_forged_consistency_proof_or_a_rewritten_history_fails(
    memory: tlog.MemoryTree, old: int, new: int
) -> None:
    proof = tlog.consistency_proof(memory, old, new)
    old_root, new_root = tlog.root(memory, old), tlog.root(memory, new)
    for i in range(len(proof)):
        forged = [*proof[:i], tlog.leaf_hash(b"forged"), *proof[i + 1 :]]
        assert not tlog.verify_consistency(old, new, old_root, new_root, forged)
    rewritten = tlog.MemoryTree([*LEAVES[: old - 1], tlog.leaf_hash(b"edited"), *LEAVES[old:new]])
    assert not tlog.verify_consistency(old, new, old_root, tlog.root(rewritten, new), proof)
    assert not tlog.verify_consistency(
        old, new, old_root, tlog.root(rewritten, new), tlog.consistency_proof(rewritten, old, new)
    )
    assert not tlog.verify_consistency(new, old, new_root, old_root, proof)


def test_bad_arguments() -> None:
    tree = tlog.MemoryTree(LEAVES[:5])
    with pytest.raises(ValueError, match="not in a tree"):
        tlog.inclusion_proof(tree, 5, 5)
    with pytest.raises(ValueError, match="no consistency proof"):
        tlog.consistency_proof(tree, 0, 5)
    with pytest.raises(ValueError, match="power of two"):
        tlog.fold(LEAVES[:3])
    assert not tlog.verify_inclusion(LEAVES[0], 5, 5, [], tlog.root(tree, 5))
