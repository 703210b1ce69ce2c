"""`topic-audit send`: sign and post Tencent-style callbacks, one by one or as steady load."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from topic_audit.cli.options import CONTEXT
from topic_audit.tencent import samples


@click.command(context_settings=CONTEXT)
@click.option(
    "--url",
    envvar="TOPIC_AUDIT_SEND_URL",
    default="http://127.0.0.1:8000/callback",
    show_default=True,
    show_envvar=True,
    help="The receiver's callback URL.",
)
@click.option(
    "--sdkappid",
    envvar="TOPIC_AUDIT_SDKAPPID",
    required=True,
    show_envvar=True,
    help="SDKAppID to put in the query string.",
)
@click.option(
    "--sample",
    "sample_names",
    multiple=True,
    type=click.Choice(sorted(samples.SAMPLES)),
    envvar="TOPIC_AUDIT_SEND_SAMPLE",
    show_envvar=True,
    help="A documented sample to send (repeatable). Default: the topic lifecycle "
    "before-create, after-create, info-changed, destroyed.",
)
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    envvar="TOPIC_AUDIT_SEND_FILE",
    show_envvar=True,
    help="Send this JSON body instead of samples ('-' for stdin); its CallbackCommand is used.",
)
@click.option(
    "--unique/--no-unique",
    default=True,
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_UNIQUE",
    show_envvar=True,
    help="Give each run its own TopicId so that samples are new topics, not redeliveries.",
)
@click.option(
    "--count",
    default=1,
    type=click.IntRange(1),
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_COUNT",
    show_envvar=True,
    help="Send everything this many times.",
)
@click.option(
    "--rate",
    type=click.FloatRange(0),
    envvar="TOPIC_AUDIT_SEND_RATE",
    show_envvar=True,
    help="Load mode: deliveries per second (0: as fast as the connections allow).",
)
@click.option(
    "--duration",
    type=click.FloatRange(0.1),
    envvar="TOPIC_AUDIT_SEND_DURATION",
    show_envvar=True,
    help="Load mode: how long to send, in seconds. [default: 10 when --rate is given]",
)
@click.option(
    "--concurrency",
    default=8,
    type=click.IntRange(1, 1024),
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_CONCURRENCY",
    show_envvar=True,
    help="Load mode: connections in flight at once.",
)
@click.option(
    "--mix",
    default="good=90,duplicate=5,bad=5",
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_MIX",
    show_envvar=True,
    help="Load mode: weights of good deliveries (topic lifecycles), duplicates (Tencent retries) and bad "
    "ones (wrong signature, malformed JSON, wrong app id, invalid payload).",
)
def send(
    url: str,
    sdkappid: str,
    sample_names: tuple[str, ...],
    file: Any,
    unique: bool,
    count: int,
    rate: float | None,
    duration: float | None,
    concurrency: int,
    mix: str,
) -> None:
    """Sign and post Tencent-style callbacks, printing each answer.

    With --rate or --duration, send steady load instead and print a summary (statuses, latency
    percentiles). Signs with TOPIC_AUDIT_TOKEN when it is set (read from the environment only).
    """
    import os

    import httpx

    token = os.environ.get("TOPIC_AUDIT_TOKEN") or None
    if rate is not None or duration is not None:
        from topic_audit.demo import load

        try:
            weights = load.parse_mix(mix)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--mix") from None
        report = load.run_blocking(
            url=url,
            sdk_app_id=sdkappid,
            token=token,
            rate=rate or 0.0,
            duration=duration or 10.0,
            concurrency=concurrency,
            mix=weights,
        )
        click.echo(report.summary())
        if report.sent == 0 or report.errors:
            sys.exit(1)
        return
    if file is not None:
        raw = file.read()
        try:
            command = json.loads(raw).get("CallbackCommand", "")
        except (ValueError, AttributeError):
            command = ""
        bodies = [(command, raw)]
    else:
        names = sample_names or ("before-create", "after-create", "info-changed", "destroyed")
        suffix = f"{int(time.time() * 1000):x}" if unique else ""
        bodies = [
            (samples.SAMPLES[n]["CallbackCommand"], _encode(_uniquify(samples.sample(n), suffix)))
            for n in names
        ]
    failures = 0
    with httpx.Client(timeout=5.0) as client:
        for _ in range(count):
            for command, body in bodies:
                target = f"{url}?{samples.query(sdkappid, command, token)}"
                try:
                    response = client.post(target, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    raise click.ClickException(f"cannot reach {url}: {exc}") from None
                failures += response.status_code != 200
                click.echo(f"{response.status_code} {command or '(no command)'} {response.text}")
    if failures:
        sys.exit(1)


def _uniquify(body: dict[str, Any], suffix: str) -> dict[str, Any]:
    if not suffix:
        return body
    if "TopicId" in body:
        body["TopicId"] = f"{body['TopicId']}{suffix}"
    if "TopicIdList" in body:
        body["TopicIdList"] = [f"{t}{suffix}" for t in body["TopicIdList"]]
    return body


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()
