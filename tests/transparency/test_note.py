"""Signed notes and checkpoints (topic_audit.transparency.note) against the specs' own vectors.

Go's golang.org/x/mod/sumdb/note example (sumdb/note/example_test.go: ExampleSign, ExampleOpen) and the
example of c2sp.org/signed-note ("Verifier keys"); Ed25519 is deterministic, so our signature of Go's
example text with Go's example key must be Go's, byte for byte.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from topic_audit.transparency import note

GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n— example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


def go_key() -> Ed25519PrivateKey:
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert seed[0] == note.ED25519
    return Ed25519PrivateKey.from_private_bytes(seed[1:])


def test_go_example_signs_byte_for_byte() -> None:
    assert note.sign(GO_TEXT, "PeterNeumann", go_key()) == GO_NOTE


def test_go_example_opens_and_its_vkey_round_trips() -> None:
    verifier = note.Verifier.from_vkey(GO_VKEY)
    assert (verifier.name, verifier.key_id) == ("PeterNeumann", 0xC74F20A3)
    assert note.open_note(GO_NOTE, verifier) == GO_TEXT
    assert verifier.vkey == GO_VKEY
    assert note.Verifier.for_key("PeterNeumann", note.raw_public_key(go_key())).vkey == GO_VKEY


def test_spec_example_opens() -> None:
    assert note.open_note(SPEC_NOTE, note.Verifier.from_vkey(SPEC_VKEY)) == "This is an example message.\n"


def test_other_signatures_are_ignored_and_a_cosigned_note_still_opens() -> None:
    cosigned = (
        GO_NOTE + "— witness.example " + base64.b64encode(b"\x01\x02\x03\x04" + bytes(64)).decode() + "\n"
    )
    assert note.open_note(cosigned, note.Verifier.from_vkey(GO_VKEY)) == GO_TEXT
    assert note.signatures(cosigned) == [("PeterNeumann", 0xC74F20A3), ("witness.example", 0x01020304)]


def test_another_key_a_bad_signature_and_malformed_notes() -> None:
    verifier = note.Verifier.from_vkey(GO_VKEY)
    other = note.sign(GO_TEXT, "PeterNeumann", Ed25519PrivateKey.generate())
    with pytest.raises(note.UnknownKey, match="not signed by PeterNeumann\\+c74f20a3"):
        note.open_note(other, verifier)
    with pytest.raises(note.BadSignature):
        note.open_note(GO_NOTE.replace("problem,", "problem;"), verifier)
    for bad in (
        GO_TEXT,
        GO_NOTE.replace("— ", "- "),
        GO_NOTE.replace("\n—", "\x07\n—"),
        GO_NOTE[:-1] + "!\n",
    ):
        with pytest.raises(note.MalformedNote):
            note.open_note(bad, verifier)
    for vkey in (
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "a+b",
        "x y+00000000+AA==",
    ):
        with pytest.raises(note.MalformedNote):
            note.Verifier.from_vkey(vkey)
    with pytest.raises(note.MalformedNote):
        note.sign("no newline", "PeterNeumann", go_key())


def test_checkpoint_body_round_trips_and_is_strict() -> None:
    cp = note.Checkpoint(
        "example.com/behind-the-sofa",
        20852163,
        base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="),
    )
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert cp.text() == text
    assert note.Checkpoint.parse(text) == cp
    for bad in (
        text.replace("20852163", "020852163"),
        text.replace("20852163", "-1"),
        text[:-1],
        "a\n1\n\n",
        text.replace("CsUY", "AA"),
    ):
        with pytest.raises(note.MalformedNote):
            note.Checkpoint.parse(bad)
