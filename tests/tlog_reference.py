"""An independent reference implementation of the Merkle tree of RFC 9162 (Certificate Transparency 2.0) §2.1.

Written from the RFC's text alone, with SHA-256 as HASH, so that the tests can check the service's own
transparency-log code against something that shares none of its code. Every function follows the RFC's
definitions literally (recursive, slow, obvious); the comments cite the RFC's section and step numbers.

Sizes and indexes are as in the RFC: a tree of size n holds leaves 0 .. n-1.
"""

from __future__ import annotations

import hashlib
import hmac

HASH_SIZE = 32  # SHA-256, the HASH of RFC 9162 §2.1 for the logs this project speaks of


def leaf_hash(data: bytes) -> bytes:
    """§2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """§2.1.1: MTH(D_n) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """§2.1.1: "k is the largest power of two smaller than n (i.e., k < n <= 2k)", for n > 1."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaves(leaves: list[bytes]) -> bytes:
    """§2.1.1, the Merkle Tree Hash of the leaf data D_n."""
    n = len(leaves)
    if n == 0:
        # "The hash of an empty list is the hash of an empty string: MTH({}) = HASH()."
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hash(leaves[0])
    k = _split(n)
    return node_hash(root_from_leaves(leaves[:k]), root_from_leaves(leaves[k:]))


def inclusion_proof(leaves: list[bytes], index: int) -> list[bytes]:
    """§2.1.3.1, PATH(m, D_n) for 0 <= m < n."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is not in a tree of size {len(leaves)}")
    return _path(index, leaves)


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []  # "The path for the single leaf in a tree with a one-element input list D[1] = {d(0)} is empty"
    k = _split(n)
    if m < k:
        # "PATH(m, D_n) = PATH(m, D[0:k]) : MTH(D[k:n])" for m < k
        return [*_path(m, leaves[:k]), root_from_leaves(leaves[k:])]
    # "PATH(m, D_n) = PATH(m - k, D[k:n]) : MTH(D[0:k])" for m >= k
    return [*_path(m - k, leaves[k:]), root_from_leaves(leaves[:k])]


def consistency_proof(leaves: list[bytes], old_size: int) -> list[bytes]:
    """§2.1.4.1, PROOF(m, D_n) = SUBPROOF(m, D_n, true).

    The RFC defines it for 0 < m < n; m == n is allowed here too, where the definition itself gives the
    empty proof (SUBPROOF(m, D[m], true) = {}). m == 0 and m > n have no proof and raise ValueError.
    """
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"no consistency proof from size {old_size} to size {len(leaves)}")
    return _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        # "SUBPROOF(m, D[m], true) = {}" and "SUBPROOF(m, D[m], false) = {MTH(D[m])}"
        return [] if b else [root_from_leaves(leaves)]
    k = _split(n)
    if m <= k:
        # "SUBPROOF(m, D_n, b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n])" for m <= k
        return [*_subproof(m, leaves[:k], b), root_from_leaves(leaves[k:])]
    # "SUBPROOF(m, D_n, b) = SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])" for m > k
    return [*_subproof(m - k, leaves[k:], False), root_from_leaves(leaves[:k])]


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_path(value: object) -> bool:
    return isinstance(value, list) and all(_is_hash(h) for h in value)


def _shift_until_lsb_set_or_zero(fn: int, sn: int) -> tuple[int, int]:
    """§2.1.3.2 step 4.b.ii and §2.1.4.2 step 6.b.iii: "right-shift both fn and sn equally until either
    LSB(fn) is set or fn is 0"."""
    while not fn & 1 and fn != 0:
        fn >>= 1
        sn >>= 1
    return fn, sn


def verify_inclusion(leaf_data: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """§2.1.3.2 for the leaf holding leaf_data; False for a wrong proof or any malformed argument."""
    if not isinstance(leaf_data, bytes):
        return False
    return verify_inclusion_hash(leaf_hash(leaf_data), index, size, proof, root)


def verify_inclusion_hash(hash_: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """§2.1.3.2 for an input hash (the leaf's hash, as the published test vectors give it)."""
    # Malformed input is a failed verification, never an exception: sizes and indexes are non-negative
    # integers, and every hash (input, path element, root) is a SHA-256 output of HASH_SIZE bytes.
    if not (_is_size(index) and _is_size(size) and _is_hash(hash_) and _is_path(proof) and _is_hash(root)):
        return False
    # 1. "If leaf_index is greater than or equal to tree_size, then fail the proof verification."
    #    (This also fails every proof in the empty tree: no leaf is in it.)
    if index >= size:
        return False
    # 2. "Set fn to leaf_index and sn to tree_size - 1."
    fn, sn = index, size - 1
    # 3. "Set r to hash."
    r = hash_
    # 4. "For each value p in the inclusion_path array:"
    for p in proof:
        # a. "If sn is 0, then stop the iteration and fail the proof verification."
        if sn == 0:
            return False
        # b. "If LSB(fn) is set, or if fn is equal to sn, then:"
        if fn & 1 or fn == sn:
            # i. "Set r to HASH(0x01 || p || r)."
            r = node_hash(p, r)
            # ii. "If LSB(fn) is not set, then right-shift both fn and sn equally until either LSB(fn)
            #     is set or fn is 0."
            fn, sn = _shift_until_lsb_set_or_zero(fn, sn)
        else:
            # "Otherwise:" i. "Set r to HASH(0x01 || r || p)."
            r = node_hash(r, p)
        # c. "Finally, right-shift both fn and sn one time."
        fn >>= 1
        sn >>= 1
    # 5. "If sn is equal to 0 and r and the root_hash are equal, then the log has proven the inclusion of
    #    hash. Otherwise, fail the proof verification."
    return sn == 0 and hmac.compare_digest(r, root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> bool:
    """§2.1.4.2 between (first, first_hash) = (old_size, old_root) and (second, second_hash) = (new_size,
    new_root); False for a wrong proof or any malformed argument.

    The RFC gives the algorithm for "0 < first < second" only. Outside that range:
    - old_size > new_size: False. A log only grows (§2.1.4: a later tree head contains everything in the
      earlier one), so a smaller "new" tree is never consistent with a bigger old one.
    - old_size == 0: False, whatever the proof and roots (also for new_size == 0). §2.1.4.1 defines
      PROOF(m, D_n) only for 0 < m, so there is no consistency proof from the empty tree to check.
    - old_size == new_size > 0: True only for the empty proof and old_root == new_root. §2.1.4.1's
      definition gives PROOF(m, D_m) = SUBPROOF(m, D_m, true) = {} (nothing to prove between one tree and
      itself), so a non-empty proof is malformed, and two heads of the same size must be the same head.
    Sizes are non-negative integers and every hash (roots, proof elements) is HASH_SIZE bytes, else False.
    """
    if not (
        _is_size(old_size)
        and _is_size(new_size)
        and _is_hash(old_root)
        and _is_hash(new_root)
        and _is_path(proof)
    ):
        return False
    if old_size > new_size or old_size == 0:
        return False
    if old_size == new_size:
        return not proof and hmac.compare_digest(old_root, new_root)
    first, second, first_hash, second_hash = old_size, new_size, old_root, new_root
    # 1. "If consistency_path is an empty array, stop and fail the proof verification."
    if not proof:
        return False
    path = list(proof)
    # 2. "If first is an exact power of 2, then prepend first_hash to the consistency_path array."
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    # 3. "Set fn to first - 1 and sn to second - 1."
    fn, sn = first - 1, second - 1
    # 4. "If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set."
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. "Set both fr and sr to the first value in the consistency_path array."
    fr = sr = path[0]
    # 6. "For each subsequent value c in the consistency_path array:"
    for c in path[1:]:
        # a. "If sn is 0, then stop the iteration and fail the proof verification."
        if sn == 0:
            return False
        # b. "If LSB(fn) is set, or if fn is equal to sn, then:"
        if fn & 1 or fn == sn:
            # i. "Set fr to HASH(0x01 || c || fr)."  ii. "Set sr to HASH(0x01 || c || sr)."
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # iii. "If LSB(fn) is not set, then right-shift both fn and sn equally until either LSB(fn) is
            #      set or fn is 0."
            fn, sn = _shift_until_lsb_set_or_zero(fn, sn)
        else:
            # "Otherwise:" i. "Set sr to HASH(0x01 || sr || c)."
            sr = node_hash(sr, c)
        # c. "Finally, right-shift both fn and sn one time."
        fn >>= 1
        sn >>= 1
    # 7. "verify that the fr calculated is equal to the first_hash supplied, that the sr calculated is equal
    #    to the second_hash supplied, and that sn is 0."
    return hmac.compare_digest(fr, first_hash) and hmac.compare_digest(sr, second_hash) and sn == 0
