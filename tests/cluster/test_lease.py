"""The writer lease against a real JetStream key-value bucket (one ``nats-server``): one holder at a time,
renewed by compare-and-set, lost to another after the time to live, taken again when it expired with
nobody else there, kept when a renewal's answer was lost, given up at once on a clean stop."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import free_port, start_on_free_ports
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from processes import SERVER, needs_nats
from topic_audit.cluster.lease import KEY, MARGIN, Lease, Lost

pytestmark = needs_nats

TTL = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    log = tmp_path / "nats.log"
    url = ""

    def launch() -> tuple[subprocess.Popen[Any], set[int]]:
        nonlocal url
        port = free_port()
        url = f"nats://127.0.0.1:{port}"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "store")],
                stdout=out,
                stderr=out,
            )
        return process, {port}

    process = start_on_free_ports(launch, log)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def run(server: str) -> Callable[[Callable[[KeyValue], Coroutine[Any, Any, None]]], None]:
    """Run a scenario with a fresh bucket whose time to live is :data:`TTL`."""

    def scenario(body: Callable[[KeyValue], Coroutine[Any, Any, None]]) -> None:
        async def main() -> None:
            async with connected(server) as kv:
                await body(kv)

        asyncio.run(main())

    return scenario


class connected:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> KeyValue:
        self.nc = await nats.connect(self.url)
        js = self.nc.jetstream(timeout=5)
        return await js.create_key_value(
            KeyValueConfig(bucket="lease_test", ttl=TTL, history=1, storage=StorageType.FILE)
        )

    async def __aexit__(self, *_: object) -> None:
        await self.nc.close()


async def expired(kv: KeyValue, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await kv.get(KEY)
        except Exception:  # no such key: the bucket's time to live removed it
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the lease never expired")


def test_one_holder_at_a_time_and_the_other_takes_it_once_it_expired(run: Any) -> None:
    async def body(kv: KeyValue) -> None:
        first, second = Lease(kv, "first", TTL), Lease(kv, "second", TTL)
        assert await first.take()
        assert not await second.take()
        assert await second.holder() == "first"
        await first.renew()
        assert first.valid() and not second.valid()
        await expired(kv)  # first stopped renewing
        assert not first.valid()
        assert await second.take()
        with pytest.raises(Lost, match="second"):
            await first.renew()
        assert not first.valid()
        await second.renew()

    run(body)


def test_a_lease_expired_with_nobody_else_is_taken_again(run: Any) -> None:
    async def body(kv: KeyValue) -> None:
        lease = Lease(kv, "only", TTL)
        assert await lease.take()
        await expired(kv)  # the bucket's stream had no leader for longer than the TTL, say
        await lease.renew()
        assert lease.valid()
        assert await lease.holder() == "only"

    run(body)


def test_a_renewal_whose_answer_was_lost_is_kept(run: Any) -> None:
    async def body(kv: KeyValue) -> None:
        lease = Lease(kv, "writer", TTL)
        assert await lease.take()
        assert lease.revision is not None
        await kv.update(KEY, b"writer", last=lease.revision)  # stored; its answer never reached the lease
        await lease.renew()  # refused (another revision there), yet its own
        assert lease.valid()
        await lease.renew()

    run(body)


def test_validity_ends_before_the_key_does_and_a_release_frees_it_at_once(run: Any) -> None:
    async def body(kv: KeyValue) -> None:
        lease, standby = Lease(kv, "writer", TTL), Lease(kv, "standby", TTL)
        assert await lease.take()
        assert lease.valid_until - time.monotonic() <= MARGIN * TTL
        await asyncio.sleep(MARGIN * TTL + 0.05)
        assert not lease.valid(), "applying stops before another writer can take the lease"
        await lease.release()
        assert await standby.take(), "released: taken at once, not after the time to live"

    run(body)
