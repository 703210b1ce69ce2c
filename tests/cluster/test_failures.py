"""The failure table of cluster mode, against real processes under ~200 callbacks a second: a NATS server
killed, the quorum lost, the stream refusing. Each test prints what it measured."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import nats
import pytest
from conftest import wait_for
from processes import (
    Load,
    NatsCluster,
    applied,
    callback,
    exactly_once,
    leader,
    needs_nats,
    ready,
    topic_ids,
    writer_and_receiver,
)
from processes import nats_cluster_fixture as nats_cluster_fixture

pytestmark = [needs_nats, pytest.mark.slow]


def apart(cluster: NatsCluster) -> bool:
    """Both intake streams have a leader, each on another server (the active writer sees to it)."""
    first, second = (leader(cluster, name) for name in ("TOPIC_AUDIT_INTAKE_A", "TOPIC_AUDIT_INTAKE_B"))
    return "" != first != second != ""


def test_a_nats_server_killed_fails_no_answer_but_those_in_flight_on_it(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    with writer_and_receiver(tmp_path, nats_cluster) as (writer, receiver):
        wait_for(
            lambda: apart(nats_cluster),
            30,
            "the intake streams led from different servers",
            interval=1,
        )
        load = Load(receiver.url, "kill-nats")
        time.sleep(5)
        victim = leader(nats_cluster, "TOPIC_AUDIT_INTAKE_A")
        assert victim, "intake A has a leader to kill"
        killed = time.time()
        nats_cluster.kill(victim)
        time.sleep(15)
        load.stop()
        late = load.failed(after=killed + 0.05)
        during = load.failed(after=killed - 2)
        slowest = max(seconds for sent, seconds, _, _ in load.answers if sent >= killed - 1)
        print(
            f"\nkilled {victim} (leader of intake A): {len(load.answers)} callbacks, "
            f"{len(load.ok)} answered 200, {len(during)} failed around the kill, "
            f"{len(late)} failed after it; slowest answer {slowest:.3f} s"
        )
        assert not late, f"callbacks sent after the kill failed: {late[:5]}"
        assert slowest < 2.0
        wait_for(lambda: len(applied(writer.db)) >= len(load.ok), 60, "the writer to apply every answer")
        exactly_once(writer.db, load.ok)


def test_a_lost_quorum_is_answered_503_in_time_and_recovers_by_itself(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    with writer_and_receiver(tmp_path, nats_cluster) as (writer, receiver):
        before = [callback(receiver.url, f"@TGS#_g@TOPIC#_quorum-before-{n}") for n in range(20)]
        assert {a.status_code for a in before} == {200}
        survivor, *others = nats_cluster.names
        for name in others:
            nats_cluster.kill(name)
        lost = time.monotonic()
        answers = []
        for n in range(20):
            started = time.monotonic()
            answer = callback(receiver.url, f"@TGS#_g@TOPIC#_quorum-lost-{n}")
            answers.append((answer.status_code, time.monotonic() - started))
        statuses = [status for status, _ in answers]
        slowest = max(seconds for _, seconds in answers)
        print(f"\nquorum lost: answers {sorted(set(statuses))}, slowest {slowest:.3f} s")
        assert 200 not in statuses[3:], "an OK for a callback the intake could not have stored"
        assert slowest < 2.0, "past Tencent's 2 s"
        why = httpx.get(f"{receiver.url}/readyz", timeout=5)
        assert why.status_code == 503
        assert "intake" in why.text, why.text
        for name in others:
            nats_cluster.start_server(name)
        restarted = time.monotonic()
        recovered = wait_for(
            lambda: callback(receiver.url, "@TGS#_g@TOPIC#_quorum-probe").status_code == 200,
            60,
            "answers to be OK again",
            interval=0.5,
        )
        print(
            f"quorum lost for {restarted - lost:.1f} s; answering OK again "
            f"{time.monotonic() - restarted:.1f} s after the two servers started again"
        )
        wait_for(lambda: ready(receiver), 30, "the receiver to be ready again")
        after = [callback(receiver.url, f"@TGS#_g@TOPIC#_quorum-after-{n}") for n in range(20)]
        assert {a.status_code for a in after} == {200}
        answered = [f"@TGS#_g@TOPIC#_quorum-before-{n}" for n in range(20)]
        answered += [f"@TGS#_g@TOPIC#_quorum-after-{n}" for n in range(20)]
        answered += [
            f"@TGS#_g@TOPIC#_quorum-lost-{n}" for n, (status, _) in enumerate(answers) if status == 200
        ]
        assert writer.process is not None
        if writer.process.poll() is not None:  # its lease expired unrenewed while nobody could renew it
            assert writer.process.returncode == 75, "a writer whose lease lapsed exits 75"
            writer.start()  # as systemd does (Restart=on-failure, RestartForceExitStatus=75)
            print("the writer had exited 75 (its lease lapsed); started again, it took the lease back")
        wait_for(lambda: set(answered) <= set(topic_ids(writer.db)), 60, "the writer to apply every answer")
        exactly_once(writer.db, answered)
        assert recovered is not None
        assert survivor in nats_cluster.names


async def _refuse(url: str, streams: tuple[str, ...]) -> None:
    """The intake streams refusing every new message: sealed (a stream at its limits with discard "new"
    refuses the same way)."""
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream(timeout=5)
        for name in streams:
            config = (await js.stream_info(name)).config
            config.sealed = True
            await js.update_stream(config)
    finally:
        await nc.close()


def test_a_receiver_never_answers_ok_for_what_the_stream_refused(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    with writer_and_receiver(tmp_path, nats_cluster) as (writer, receiver):
        first = [callback(receiver.url, f"@TGS#_g@TOPIC#_refused-before-{n}") for n in range(10)]
        assert {a.status_code for a in first} == {200}
        asyncio.run(_refuse(nats_cluster.url, ("TOPIC_AUDIT_INTAKE_A", "TOPIC_AUDIT_INTAKE_B")))
        refused = [callback(receiver.url, f"@TGS#_g@TOPIC#_refused-{n}") for n in range(10)]
        assert [a.status_code for a in refused] == [503] * 10
        assert refused[0].json()["ErrorInfo"] == "audit_unavailable: the request could not be recorded"
        assert "was not acknowledged by the intake" in receiver.log.read_text()
        time.sleep(2)
        topics = topic_ids(writer.db)
        assert not [t for t in topics if "refused-" in t and "before" not in t]
        exactly_once(writer.db, [f"@TGS#_g@TOPIC#_refused-before-{n}" for n in range(10)])
