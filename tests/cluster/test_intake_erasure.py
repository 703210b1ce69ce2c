"""Erasure reaches the intake: an account's callbacks erased from the log are deleted from the intake
streams' message files on every server (proved by scanning the bytes of the files), the others' stay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from conftest import message, metric, run_cli, send, wait_for
from nats.js.errors import NotFoundError
from processes import NatsCluster, applied, needs_nats, writer_and_receiver
from processes import nats_cluster_fixture as nats_cluster_fixture

pytestmark = needs_nats

SECRET = "a private sentence of erin's, 7fd1c2"
KEPT = "a sentence of leckie's that stays, 41aa09"


def stream_files(cluster: NatsCluster) -> list[Path]:
    """Every file of the intake streams' message stores, on every server."""
    return [
        path
        for name in cluster.names
        for path in (cluster.folder / name).rglob("*")
        if path.is_file() and "/streams/TOPIC_AUDIT_INTAKE_" in str(path)
    ]


def holding(files: list[Path], needle: str) -> list[Path]:
    return [path for path in files if needle.encode() in path.read_bytes()]


async def _missing(url: str, where: list[tuple[str, int]]) -> list[tuple[str, int]]:
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream(timeout=5)
        gone = []
        for stream, seq in where:
            try:
                await js.get_msg(stream, seq)
            except NotFoundError:
                gone.append((stream, seq))
        return gone
    finally:
        await nc.close()


@pytest.mark.slow
def test_erasing_an_account_deletes_its_callbacks_from_the_intake(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    settings = {"TOPIC_AUDIT_CHECKPOINT_SECONDS": "1"}
    with writer_and_receiver(tmp_path, nats_cluster, **settings) as (writer, receiver):
        for n in range(5):
            assert send(receiver.url, message("erin", f"{SECRET} {n}")).status_code == 200
            assert send(receiver.url, message("leckie", f"{KEPT} {n}")).status_code == 200
        wait_for(lambda: len(applied(writer.db)) == 10, 30, "the writer to apply all 10")
        assert holding(stream_files(nats_cluster), SECRET), "the scan finds what it looks for"
        erased = run_cli(
            "erase",
            "--db",
            str(writer.db),
            "--signing-key",
            str(tmp_path / "signing.key"),
            "--account",
            "erin",
            "--reason",
            "request #12",
            "--yes",
            env={"TOPIC_AUDIT_NATS_URL": nats_cluster.url},
        )
        assert erased.returncode == 0, erased.stdout + erased.stderr
        assert "erased 5 entries" in erased.stdout
        assert "cluster mode: the intake streams still hold these callbacks" in erased.stdout
        erin = [(s, q) for s, q, _, entry in applied(writer.db) if entry in range(1, 11, 2)]
        wait_for(
            lambda: metric(writer, "topic_audit_intake_erased_messages_total") >= 5,
            30,
            "the writer to delete erin's messages",
            interval=0.5,
        )
        assert sorted(asyncio.run(_missing(nats_cluster.url, erin))) == sorted(erin)
        files = stream_files(nats_cluster)
        assert holding(files, SECRET) == [], "a deleted message's bytes remain in a stream's files"
        assert holding(files, KEPT), "the other account's callbacks stay"
        raft = [
            p
            for name in nats_cluster.names
            for p in (nats_cluster.folder / name).rglob("*")
            if p.is_file() and SECRET.encode() in p.read_bytes()
        ]
        print(f"\nerased from the stream files; still in {len(raft)} raft log files until they compact")
