"""Only topic-audit's roles reach the intake: the servers run the accounts and per-role permissions of
docs/cluster.md (with nkeys made here), the roles connect with their seeds, and the roles work -- while a
receiver's credentials cannot read the stream, and an nkey the servers do not know cannot connect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from conftest import message, run_cli, send, wait_for
from processes import NatsCluster, applied, needs_nats, ready, role

pytestmark = [needs_nats, pytest.mark.slow]

PAGE = Path(__file__).parents[2] / "docs" / "cluster.md"
EXAMPLE_KEY = re.compile(r"\bU[A-Z2-7]{55}\b")


def new_user(folder: Path, name: str) -> tuple[Path, str]:
    """An nkey user: its seed in a file (0600), and its public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = folder / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, nkeys.from_seed(seed).public_key.decode()


def documented_accounts(keys: list[str]) -> str:
    """The page's ``accounts`` block and ``system_account``, its example public keys replaced, in order,
    by ``keys`` (receivers, writers, operators)."""
    text = PAGE.read_text()
    start = text.index("\naccounts {")
    end = text.index("system_account: SYS", start) + len("system_account: SYS")
    block = text[start:end]
    examples = list(dict.fromkeys(EXAMPLE_KEY.findall(block)))
    assert len(examples) == len(keys), examples
    for example, key in zip(examples, keys, strict=True):
        block = block.replace(example, key)
    return block + "\n"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[NatsCluster, dict[str, Path]]]:
    seeds: dict[str, Path] = {}
    keys = []
    for name in ("receiver", "writer", "operator", "stranger"):
        seeds[name], public = new_user(tmp_path, name)
        keys.append(public)
    cluster = NatsCluster(tmp_path / "nats", extra=documented_accounts(keys[:3]))
    cluster.folder.mkdir()
    cluster.start()
    try:
        yield cluster, seeds
    finally:
        cluster.stop()


ATTEMPT = """
import asyncio, sys
import nats

async def attempt(url, seed, what):
    try:
        nc = await nats.connect(servers=url.split(","), nkeys_seed=seed, connect_timeout=2, allow_reconnect=False)
    except Exception as exc:
        return type(exc).__name__
    js = nc.jetstream(timeout=2)
    try:
        if what == "read":
            await js.get_msg("TOPIC_AUDIT_INTAKE_A", 1)
        elif what == "delete":
            await js.delete_msg("TOPIC_AUDIT_INTAKE_A", 1)
        else:
            sub = await js.subscribe("topic_audit.intake.a", stream="TOPIC_AUDIT_INTAKE_A", ordered_consumer=True)
            await sub.next_msg(timeout=2)
        return "ok"
    except Exception as exc:
        return type(exc).__name__

async def bounded():
    try:
        return await asyncio.wait_for(attempt(*sys.argv[1:]), 10)
    except TimeoutError:
        return "TimeoutError"

print(asyncio.run(bounded()))
"""


def attempt(url: str, seed: Path, what: str) -> str:
    """What a client holding ``seed`` gets when it tries to ``what`` the intake: "ok", or the error's name
    (TimeoutError for a request the server refused without an answer). In a process of its own: a
    refused client leaves its socket to the garbage collector."""
    done = subprocess.run(
        [sys.executable, "-c", ATTEMPT, url, str(seed), what], capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip() or done.stderr.strip()[-300:]


def test_the_documented_permissions_let_each_role_do_its_part_and_no_more(
    tmp_path: Path, guarded: tuple[NatsCluster, dict[str, Path]]
) -> None:
    cluster, seeds = guarded
    writer = role(
        tmp_path,
        cluster,
        "writer-a",
        "writer",
        TOPIC_AUDIT_NATS_CREDENTIALS=str(seeds["writer"]),
        TOPIC_AUDIT_CHECKPOINT_SECONDS="1",
    ).start()
    receiver = role(
        tmp_path, cluster, "receiver-1", "receiver", TOPIC_AUDIT_NATS_CREDENTIALS=str(seeds["receiver"])
    ).start()
    try:
        wait_for(
            lambda: ready(writer) and ready(receiver), 60, "the writer and the receiver, with credentials"
        )
        for n in range(5):
            assert send(receiver.url, message("erin", f"hello {n}")).status_code == 200
        wait_for(lambda: len(applied(writer.db)) == 5, 30, "the writer to apply all 5")
        outcomes = {
            (who, what): attempt(cluster.url, seeds[who], what)
            for who in ("receiver", "stranger")
            for what in ("read", "delete", "consume")
        }
        print(f"\n{outcomes}")
        assert all(outcome != "ok" for outcome in outcomes.values()), outcomes
        assert {outcomes[("stranger", what)] for what in ("read", "delete", "consume")} == {"Error"}
        erased = run_cli(
            "erase",
            "--db",
            str(writer.db),
            "--signing-key",
            str(tmp_path / "signing.key"),
            "--account",
            "erin",
            "--reason",
            "request #3",
            "--yes",
        )
        assert erased.returncode == 0, erased.stderr
        wait_for(  # the writer's permissions include deleting the erased messages
            lambda: "deleted 5 messages" in writer.log.read_text(), 30, "the writer to delete the messages"
        )
        writer.stop()  # started again, it resumes the streams where its log stopped
        writer.start()
        wait_for(lambda: ready(writer), 60, "the writer to hold the lease again")
        for n in range(2):
            assert send(receiver.url, message("leckie", f"again {n}")).status_code == 200
        wait_for(lambda: len(applied(writer.db)) == 7, 30, "the writer, started again, to apply both")
        assert "Error" not in writer.log.read_text().split("holds the writer lease")[-1]
    finally:
        receiver.stop()
        writer.stop()
