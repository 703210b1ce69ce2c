"""RFC 9162 Merkle tree math, and nothing else: hashes, proofs and their verification.

The tree over leaves ``D[0:n]`` (RFC 9162 §2.1.1): the leaf hash is ``SHA-256(0x00 || data)``, a node
``SHA-256(0x01 || left || right)``, the hash of the empty tree ``SHA-256()``; a tree of ``n > 1`` leaves
splits at ``k``, the largest power of two below ``n``. Proofs are generated as §2.1.3.1 and §2.1.4.1
describe and verified with the algorithms of §2.1.3.2 and §2.1.4.2.

Proofs are computed from a :class:`HashReader`, which answers the hash of one complete, aligned subtree
(``2**height`` leaves from ``index * 2**height``): the stored tree (``topic_audit.transparency.tree``) reads those
from hash tiles, :class:`MemoryTree` from a list. A proof needs O(log n) of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def fold(hashes: Sequence[bytes]) -> bytes:
    """The root of a complete subtree whose ``2**k`` bottom hashes are ``hashes`` (left to right)."""
    level = list(hashes)
    if not level or len(level) & (len(level) - 1):
        raise ValueError(f"a complete subtree has a power of two of hashes, not {len(level)}")
    sha = hashlib.sha256
    while len(level) > 1:
        level = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n > 1``)."""
    return 1 << ((n - 1).bit_length() - 1)


class HashReader(Protocol):
    def subtree(self, height: int, index: int) -> bytes:
        """MTH of the complete subtree of ``2**height`` leaves starting at leaf ``index * 2**height``."""
        ...


def range_hash(reader: HashReader, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for ``start < end`` where ``start`` is a multiple of the largest power of two
    not above ``end - start`` (as every range in the RFC's recursions is)."""
    n = end - start
    if n & (n - 1) == 0:
        height = n.bit_length() - 1
        return reader.subtree(height, start >> height)
    k = _split(n)
    return node_hash(reader.subtree(k.bit_length() - 1, start // k), range_hash(reader, start + k, end))


def root(reader: HashReader, size: int) -> bytes:
    return range_hash(reader, 0, size) if size else EMPTY_ROOT


def inclusion_proof(reader: HashReader, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), from the leaf's sibling up."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:  # descend to the leaf; siblings are collected top-down, then reversed
        k = _split(end - start)
        if index < start + k:
            path.append(range_hash(reader, start + k, end))
            end = start + k
        else:
            path.append(range_hash(reader, start, start + k))
            start += k
    return path[::-1]


def consistency_proof(reader: HashReader, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) (RFC 9162 §2.1.4.1); empty when the sizes are equal."""
    if not 0 < old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    path: list[bytes] = []
    start, end, m, whole = 0, new_size, old_size, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            path.append(range_hash(reader, start + k, end))
            end = start + k
        else:
            path.append(range_hash(reader, start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        path.append(range_hash(reader, start, end))
    return path[::-1]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` put the leaf hash ``leaf`` at ``index`` of the tree ``root_hash``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root_hash


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: does ``proof`` show the tree ``new_root`` extends the tree ``old_root``?

    Equal sizes need an empty proof and equal roots; the empty tree is extended by every tree.
    """
    if old_size == new_size:
        return not proof and old_root == new_root
    if not 0 <= old_size < new_size:
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0


class MemoryTree:
    """A tree held in memory (every level), from leaf hashes: for small trees and tests."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    def append(self, leaf: bytes) -> None:
        self.levels[0].append(leaf)
        height = 0
        while len(self.levels[height]) % 2 == 0:
            left, right = self.levels[height][-2:]
            if height + 1 == len(self.levels):
                self.levels.append([])
            self.levels[height + 1].append(node_hash(left, right))
            height += 1

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def subtree(self, height: int, index: int) -> bytes:
        return self.levels[height][index]


class Frontier:
    """The roots of the maximal complete subtrees of the leaves appended so far (a compact range):
    O(log n) memory, the root of every prefix in one pass (what ``verify`` recomputes)."""

    def __init__(self) -> None:
        self.size = 0
        self.stack: list[bytes] = []

    def push(self, subtree: bytes, height: int = 0) -> None:
        """Append a complete subtree of ``2**height`` leaves (a leaf hash at height 0); the tree's size
        must be a multiple of ``2**height``."""
        if self.size & ((1 << height) - 1):
            raise ValueError(f"a subtree of height {height} cannot follow {self.size} leaves")
        self.stack.append(subtree)
        self.size += 1 << height
        n = self.size >> height
        while n & 1 == 0:
            right = self.stack.pop()
            self.stack[-1] = node_hash(self.stack[-1], right)
            n >>= 1

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Append leaf hashes, whole aligned blocks of 256 folded at once."""
        i = 0
        while i < len(leaves):
            if self.size & 255 == 0 and len(leaves) - i >= 256:
                self.push(fold(leaves[i : i + 256]), 8)
                i += 256
            else:
                self.push(leaves[i])
                i += 1

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        r = self.stack[-1]
        for left in reversed(self.stack[:-1]):
            r = node_hash(left, r)
        return r
