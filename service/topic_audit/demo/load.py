"""Steady callback traffic for ``topic-audit send --rate/--duration``: a chosen mix of good, duplicate
and bad deliveries, signed like Tencent's, at a fixed rate over a number of connections.

Good deliveries walk unique topics through their lifecycle (create, change, destroy); duplicates resend
an earlier good body with a fresh signature (a Tencent retry); bad ones are each of the common
rejections in turn (wrong signature, malformed JSON, wrong app id, invalid payload).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from topic_audit.tencent import models, samples

KINDS = ("good", "duplicate", "bad")


def parse_mix(text: str) -> dict[str, int]:
    """``good=90,duplicate=5,bad=5`` -> weights; unknown kinds or non-positive totals are errors."""
    mix = dict.fromkeys(KINDS, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        if kind not in mix or not weight.isdigit():
            raise ValueError(f"bad mix entry {part!r}; expected e.g. good=90,duplicate=5,bad=5")
        mix[kind] = int(weight)
    if sum(mix.values()) <= 0:
        raise ValueError("the mix needs at least one positive weight")
    return mix


@dataclass
class Report:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        statuses = " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items()))
        kinds = " ".join(f"{k}:{n}" for k, n in sorted(self.kinds.items()))
        return (
            f"sent {self.sent} in {self.seconds:.1f} s ({rate:.0f}/s); {kinds}; status {statuses}; "
            f"connection errors {self.errors}; latency p50 {self.percentile(50) * 1000:.1f} ms "
            f"p99 {self.percentile(99) * 1000:.1f} ms max {max(self.latencies, default=0) * 1000:.1f} ms"
        )


class Traffic:
    """Builds the next delivery of each kind."""

    def __init__(self, sdk_app_id: str, token: str | None, seed: int = 0) -> None:
        self.sdk_app_id, self.token = sdk_app_id, token
        self.rng = random.Random(seed)
        self.run = f"{int(time.time() * 1000):x}"
        self.serial = 0
        self.live: list[str] = []
        self.sent_good: list[tuple[str, bytes]] = []
        self.bad_turn = 0

    def _signed(self, command: str, token: str | None = None, app_id: str | None = None) -> str:
        return samples.query(app_id or self.sdk_app_id, command, token if token is not None else self.token)

    def good(self) -> tuple[str, bytes]:
        self.serial += 1
        roll = self.rng.random()
        if roll < 0.5 or not self.live:
            topic = f"@TGS#_load{self.run}@TOPIC#_{self.serial}"
            self.live.append(topic)
            body = samples.sample("after-create", TopicId=topic, GroupId=f"@TGS#_load{self.run}")
        elif roll < 0.85:
            body = samples.sample("info-changed", TopicId=self.rng.choice(self.live), Name=f"n{self.serial}")
        else:
            topic = self.live.pop(self.rng.randrange(len(self.live)))
            body = samples.sample("destroyed", TopicIdList=[topic])
        raw = json.dumps(body).encode()
        self.sent_good.append((body["CallbackCommand"], raw))
        del self.sent_good[:-1000]
        return self._signed(body["CallbackCommand"]), raw

    def duplicate(self) -> tuple[str, bytes]:
        if not self.sent_good:
            return self.good()
        command, raw = self.rng.choice(self.sent_good)
        return self._signed(command), raw

    def bad(self) -> tuple[str, bytes]:
        self.bad_turn += 1
        create = models.AFTER_CREATE
        body = json.dumps(samples.sample("after-create", TopicId=f"bad{self.run}-{self.serial}")).encode()
        match self.bad_turn % 4:
            case 0:
                return self._signed(create, token="not-the-token" if self.token else None), body
            case 1:
                return self._signed(create), b'{"CallbackCommand": "Group.CallbackAfterCreateTopic", "Group'
            case 2:
                return self._signed(create, app_id="1"), body
            case _:
                return self._signed(create), json.dumps({"CallbackCommand": create, "GroupId": 7}).encode()

    def next(self, mix: dict[str, int]) -> tuple[str, str, bytes]:
        kind = self.rng.choices(KINDS, weights=[mix[k] for k in KINDS])[0]
        query, body = getattr(self, kind)()
        return kind, query, body


async def run(
    url: str,
    sdk_app_id: str,
    token: str | None,
    rate: float,
    duration: float,
    concurrency: int,
    mix: dict[str, int],
    seed: int = 0,
) -> Report:
    """Send for ``duration`` seconds at ``rate`` per second (0: as fast as the connections allow)."""
    traffic = Traffic(sdk_app_id, token, seed)
    report = Report()
    started = time.perf_counter()
    deadline = started + duration
    interval = 1.0 / rate if rate > 0 else 0.0
    next_slot = started
    lock = asyncio.Lock()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_slot
        while True:
            async with lock:
                slot = next_slot
                next_slot += interval
            if slot >= deadline or time.perf_counter() >= deadline:
                return
            delay = slot - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            kind, query, body = traffic.next(mix)
            sent_at = time.perf_counter()
            try:
                response = await client.post(f"{url}?{query}", content=body)
            except httpx.HTTPError:
                report.errors += 1
                continue
            report.latencies.append(time.perf_counter() - sent_at)
            report.statuses[response.status_code] += 1
            report.kinds[kind] += 1
            report.sent += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=5.0, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report


def run_blocking(**kwargs: Any) -> Report:
    return asyncio.run(run(**kwargs))
