"""C2SP signed notes (Ed25519) and C2SP tlog-checkpoint bodies, and nothing else.

A note is a text ending in a newline, a blank line, then signature lines ``— <key name> <base64(key
id || signature)>``. The Ed25519 key id is the first 4 bytes of ``SHA-256(name || 0x0A || 0x01 ||
public key)``; a verifier key (vkey) is ``<name>+<hex key id>+<base64(0x01 || public key)>``. A
checkpoint's text is the origin line, the tree size and the base64 root hash, one a line
(c2sp.org/signed-note, c2sp.org/tlog-checkpoint; Go's ``golang.org/x/mod/sumdb/note`` reads ours).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ED25519: Final = 0x01
MAX_SIGNATURES: Final = 100
_DASH: Final = "\N{EM DASH} "


class NoteError(ValueError):
    """A note that cannot be trusted; the subclass says why.

    NoteError
     ├── MalformedNote      not a signed note (or not a checkpoint)
     ├── UnknownKey         no signature by the expected key (another key signed it)
     └── BadSignature       a signature by the expected key that does not verify
    """


class MalformedNote(NoteError):
    pass


class UnknownKey(NoteError):
    pass


class BadSignature(NoteError):
    pass


def valid_name(name: str) -> bool:
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def key_id(name: str, public_key: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: int
    public_key: bytes
    """The raw 32-byte Ed25519 key."""

    @classmethod
    def for_key(cls, name: str, public_key: bytes) -> Verifier:
        if not valid_name(name):
            raise MalformedNote(f"{name!r} cannot name a note key (empty, a space or a '+')")
        return cls(name, key_id(name, public_key), public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3 or len(parts[1]) != 8 or not valid_name(parts[0]):
            raise MalformedNote("not a verifier key <name>+<hex key id>+<base64 key>")
        try:
            hash_, key = int(parts[1], 16), base64.b64decode(parts[2], validate=True)
        except (ValueError, binascii.Error):
            raise MalformedNote("not a verifier key <name>+<hex key id>+<base64 key>") from None
        if len(key) != 33 or key[0] != ED25519:
            raise MalformedNote("the verifier key is not an Ed25519 key")
        if key_id(parts[0], key[1:]) != hash_:
            raise MalformedNote("the verifier key's id does not match its name and key")
        return cls(parts[0], hash_, key[1:])

    @property
    def vkey(self) -> str:
        return (
            f"{self.name}+{self.key_id:08x}+{base64.b64encode(bytes([ED25519]) + self.public_key).decode()}"
        )

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, text)
        except (InvalidSignature, ValueError):
            return False
        return True


def sign(text: str, name: str, key: Ed25519PrivateKey) -> str:
    """The signed note of ``text`` (which must end in a newline) by ``key`` under ``name``."""
    if not text.endswith("\n"):
        raise MalformedNote("a note's text ends in a newline")
    verifier = Verifier.for_key(name, raw_public_key(key))
    signature = verifier.key_id.to_bytes(4, "big") + key.sign(text.encode())
    return f"{text}\n{_DASH}{name} {base64.b64encode(signature).decode()}\n"


def open_note(note: str, verifier: Verifier) -> str:
    """The text of ``note`` once its signature by ``verifier`` is checked; raises :class:`NoteError`.

    Signatures by other keys (witnesses' cosignatures, say) are ignored, as the spec requires."""
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise MalformedNote("a note holds no control characters but newlines")
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise MalformedNote("not a signed note (no blank line before the signatures)")
    text, lines = note[: split + 1], note[split + 2 : -1].split("\n")
    if not lines or len(lines) > MAX_SIGNATURES:
        raise MalformedNote("a signed note has 1 to 100 signature lines")
    names = []
    for line in lines:
        name, _, b64 = line.removeprefix(_DASH).partition(" ")
        try:
            signature = base64.b64decode(b64, validate=True)
        except binascii.Error:
            signature = b""
        if not line.startswith(_DASH) or not valid_name(name) or len(signature) < 5:
            raise MalformedNote(f"not a signature line: {line[:60]!r}")
        names.append(f"{name}+{int.from_bytes(signature[:4], 'big'):08x}")
        if name == verifier.name and int.from_bytes(signature[:4], "big") == verifier.key_id:
            if not verifier.verify(text.encode(), signature[4:]):
                raise BadSignature(f"the signature by {verifier.name}+{verifier.key_id:08x} does not verify")
            return text
    raise UnknownKey(f"not signed by {verifier.name}+{verifier.key_id:08x} (signed by {', '.join(names)})")


def signatures(note: str) -> list[tuple[str, int]]:
    """The (key name, key id) of each signature line, unverified (to say who did sign)."""
    out = []
    for line in note[note.rfind("\n\n") + 2 :].split("\n")[:-1]:
        name, _, b64 = line.removeprefix(_DASH).partition(" ")
        try:
            out.append((name, int.from_bytes(base64.b64decode(b64)[:4], "big")))
        except binascii.Error:
            continue
    return out


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
            raise MalformedNote("a checkpoint is an origin, a size and a root hash, one a line")
        origin, size, root = lines[0], lines[1], lines[2]
        if not (size.isascii() and size.isdigit()) or (size != "0" and size.startswith("0")):
            raise MalformedNote(f"the checkpoint's size {size!r} is not a decimal number")
        try:
            digest = base64.b64decode(root, validate=True)
        except binascii.Error:
            digest = b""
        if len(digest) != 32:
            raise MalformedNote("the checkpoint's root is not a base64 SHA-256 hash")
        return cls(origin, int(size), digest, tuple(lines[3:-1]))
