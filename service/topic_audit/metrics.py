"""Every Prometheus metric of the service, declared here, with bounded label values created up front.

A healthy service reports zeros rather than nothing, so that alert expressions see data from the start.
Each app has its own registry (tests build many apps in one process).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from topic_audit.tencent import checks, models

REASONS: Final = checks.REASONS
# Every (outcome, reason) pair the receiver can record.
OUTCOME_REASONS: Final = (
    ("accepted", "none"),
    ("duplicate", "none"),
    ("ignored", "none"),
    *(("rejected", reason) for reason in REASONS),
    ("error", "internal_error"),
)
RESTART_KINDS: Final = ("reload", "crash")
HEADER_TIMEOUT_RECEIVED: Final = ("nothing", "partial")
ERASURE_CAUSES: Final = ("request", "retention", "policy")
FORWARD_RESULTS: Final = ("delivered", "http_error", "timeout", "connection_error")
COMMAND_LABELS: Final = (*models.KNOWN_COMMANDS, "other")
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
APPEND_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


INTAKE_STREAMS = ("TOPIC_AUDIT_INTAKE_A", "TOPIC_AUDIT_INTAKE_B")
"""The two streams a receiver publishes to (:mod:`topic_audit.cluster.jetstream`)."""


def command_label(command: str | None) -> str:
    return command if command is not None and command in models.KNOWN_COMMANDS else "other"


def package_version() -> str:
    try:
        return version("topic-audit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


class ErasedEntries(Collector):
    """``topic_audit_erased_entries_total{cause}``: entries whose content was erased, as the ``erasures``
    records say (refreshed by :func:`topic_audit.writer.retention.report`)."""

    def __init__(self) -> None:
        self.erased: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "topic_audit_erased_entries",
            "Log entries whose content was erased, by cause (request, retention, policy), from the erasures "
            "records.",
            labels=["cause"],
        )
        for cause in ERASURE_CAUSES:
            family.add_metric([cause], float(self.erased.get(cause, 0)))
        yield family


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series only double what dashboards read
        self.registry = CollectorRegistry()
        r = self.registry
        self.callbacks = Counter(
            "topic_audit_callbacks",
            "Callback requests recorded in the audit log, by command, outcome and reason.",
            ["command", "outcome", "reason"],
            registry=r,
        )
        self.duration = Histogram(
            "topic_audit_callback_duration_seconds",
            "Time from receipt of a callback to its answer (Tencent's timeout is 2 s).",
            ["command"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.append_seconds = Histogram(
            "topic_audit_audit_append_seconds",
            "Time to durably commit one write batch of the audit log.",
            buckets=APPEND_BUCKETS,
            registry=r,
        )
        self.header_timeouts = Counter(
            "topic_audit_header_timeouts",
            "Connections closed because the request head did not arrive in time "
            "(TOPIC_AUDIT_HEADER_TIMEOUT_SECONDS), by what had arrived: nothing (closed, not recorded) or "
            "partial (answered 408 and recorded, reason header_timeout).",
            ["received"],
            registry=r,
        )
        for received in HEADER_TIMEOUT_RECEIVED:
            self.header_timeouts.labels(received)
        self.append_errors = Counter(
            "topic_audit_audit_append_errors",
            "Callback rows that could not be committed to the audit log (answered 503).",
            registry=r,
        )
        # Gauges say how several worker processes combine (serve --workers): the values every writer
        # reads from the database after its commit, so the most recent is the truth.
        self.log_entries = Gauge(
            "topic_audit_log_entries", "Rows in audit_log.", registry=r, multiprocess_mode="mostrecent"
        )
        self.topics = Gauge(
            "topic_audit_topics",
            "Topics in the projection, by state.",
            ["state"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.last_accepted = Gauge(
            "topic_audit_last_accepted_timestamp_seconds",
            "Unix time of the last callback accepted into the projection.",
            registry=r,
            multiprocess_mode="max",
        )
        self.batch_rows = Histogram(
            "topic_audit_audit_batch_rows",
            "Rows committed per write batch (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.forward_attempts = Counter(
            "topic_audit_forward_attempts",
            "Delivery attempts to the app's own handler, by destination (host:port) and result "
            "(delivered, http_error, timeout, connection_error).",
            ["destination", "result"],
            registry=r,
        )
        self.forward_failed = Counter(
            "topic_audit_forward_failed",
            "Deliveries that exhausted the retry schedule (outbox state failed), by destination.",
            ["destination"],
            registry=r,
        )
        self.forward_pending = Gauge(
            "topic_audit_forward_pending",
            "Deliveries waiting in the outbox, by destination.",
            ["destination"],
            registry=r,
            multiprocess_mode="max",
        )
        self.forward_oldest_pending = Gauge(
            "topic_audit_forward_oldest_pending_seconds",
            "Age of the oldest delivery waiting in the outbox, by destination (0 when none waits).",
            ["destination"],
            registry=r,
            multiprocess_mode="max",
        )
        self.forward_duration = Histogram(
            "topic_audit_forward_duration_seconds",
            "Time of one delivery attempt, by kind (before: Tencent waits for it; after: in the background).",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        for kind in ("before", "after"):
            self.forward_duration.labels(kind)
        self.replica_lag = Gauge(
            "topic_audit_replica_lag_seconds",
            "Age of the newest change to the database not yet in the off-box replica (0 when caught up, or "
            "without a replica).",
            registry=r,
            multiprocess_mode="max",
        )
        # With serve's processes (a pid label), the processes running now: the version each one runs.
        build = Gauge(
            "topic_audit_build_info",
            "Version of the running service, per process; always 1.",
            ["version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        build.labels(package_version()).set(1)
        self.restarts = Counter(
            "topic_audit_restarts",
            "Receiver processes replaced, by kind (reload: kill -HUP; crash: one ended unasked).",
            ["kind"],
            registry=r,
        )
        for kind in RESTART_KINDS:
            self.restarts.labels(kind)
        # Read from the erasures records (topic-audit erase runs in a process of its own), so every
        # process reports the same exact count: a collector, not a per-process counter to be summed.
        self.erased_entries = ErasedEntries()
        r.register(self.erased_entries)
        self.retention = Gauge(
            "topic_audit_retention_seconds",
            "The retention period serve enforces (TOPIC_AUDIT_RETENTION_DAYS), in seconds; 0 when content is kept.",
            registry=r,
            multiprocess_mode="max",
        )
        self.oldest_content_age = Gauge(
            "topic_audit_oldest_content_age_seconds",
            "Age of the oldest log entry whose content is still kept (0 when none is).",
            registry=r,
            multiprocess_mode="max",
        )
        self.checkpoint_age = Gauge(
            "topic_audit_checkpoint_age_seconds",
            "Seconds since the last signed checkpoint (0 before the first): grows when the signer refuses "
            "to sign what does not verify, or cannot sign.",
            registry=r,
            multiprocess_mode="max",
        )
        self.checkpoint_interval = Gauge(
            "topic_audit_checkpoint_interval_seconds",
            "How often serve signs a checkpoint (TOPIC_AUDIT_CHECKPOINT_SECONDS); 0 when it does not.",
            registry=r,
            multiprocess_mode="max",
        )
        # Cluster mode (docs/cluster.md): the receivers' side of the intake, then the writer's.
        self.intake_publish_seconds = Histogram(
            "topic_audit_intake_publish_seconds",
            "Cluster mode, at a receiver: time from publishing a callback to the intake's acknowledgement "
            "(stored on a quorum), retries on the other intake stream included.",
            buckets=APPEND_BUCKETS,
            registry=r,
        )
        self.intake_publish_errors = Counter(
            "topic_audit_intake_publish_errors",
            "Cluster mode, at a receiver: publish attempts the intake did not acknowledge (timed out, "
            "refused, no connection), by stream; the callback is answered 503 only when no attempt "
            "succeeded in time (topic_audit_audit_append_errors_total).",
            ["stream"],
            registry=r,
        )
        for stream in INTAKE_STREAMS:
            self.intake_publish_errors.labels(stream)
        self.intake_published_at = Gauge(
            "topic_audit_intake_published_timestamp_seconds",
            "Cluster mode, at a receiver: when the intake last acknowledged one of its callbacks (Unix time).",
            registry=r,
            multiprocess_mode="max",
        )
        self.intake_applied_at = Gauge(
            "topic_audit_intake_applied_timestamp_seconds",
            "Cluster mode, at the active writer: when the intake stored the message applied last (Unix "
            "time): how far the log is behind the receivers' answers.",
            registry=r,
            multiprocess_mode="max",
        )
        self.intake_lag = Gauge(
            "topic_audit_intake_lag_messages",
            "Cluster mode, at the active writer: intake messages not yet applied to the log.",
            registry=r,
            multiprocess_mode="max",
        )
        self.intake_lag_seconds = Gauge(
            "topic_audit_intake_lag_seconds",
            "Cluster mode, at the active writer: age of the oldest intake message not yet applied (0 when "
            "caught up).",
            registry=r,
            multiprocess_mode="max",
        )
        self.intake_applied = Gauge(
            "topic_audit_intake_applied_sequence",
            "Cluster mode, at the active writer: the sequence applied last (committed with its entry), by "
            "intake stream.",
            ["stream"],
            registry=r,
            multiprocess_mode="max",
        )
        for stream in INTAKE_STREAMS:
            self.intake_applied.labels(stream)
        self.intake_erased = Counter(
            "topic_audit_intake_erased_messages",
            "Cluster mode, at the active writer: intake messages deleted from the streams because their "
            "entry's content was erased (on request, by retention or by policy), once the replica held the "
            "erasure.",
            registry=r,
        )
        self.writer_lease = Gauge(
            "topic_audit_writer_lease",
            "Cluster mode, at a writer: 1 while this writer holds the lease (the active one), else 0 "
            "(standing by); by writer (its host name and process id).",
            ["writer"],
            registry=r,
            multiprocess_mode="liveall",
        )

        self._callbacks = {
            (command, outcome, reason): self.callbacks.labels(command, outcome, reason)
            for command in COMMAND_LABELS
            for outcome, reason in OUTCOME_REASONS
        }
        self._durations = {command: self.duration.labels(command) for command in COMMAND_LABELS}
        self._topics = {state: self.topics.labels(state) for state in ("active", "deleted")}

    # -- reported by the app ---------------------------------------------------------------------
    def answered(self, command: str | None, seconds: float) -> None:
        self._durations[command_label(command)].observe(seconds)

    def set_initial(self, entries: int, active: int, deleted: int) -> None:
        self.log_entries.set(entries)
        self._topics["active"].set(active)
        self._topics["deleted"].set(deleted)

    def set_policy(self, retention_days: float | None, checkpoint_seconds: float) -> None:
        """The retention and checkpoint interval in force (set at start, before the first answer)."""
        self.retention.set((retention_days or 0) * 86400)
        self.checkpoint_interval.set(checkpoint_seconds)

    # -- reported by the forwarder ---------------------------------------------------------------
    def forwarding_to(self, destination: str) -> None:
        """Create every series of ``destination`` (host:port) at zero."""
        for result in FORWARD_RESULTS:
            self.forward_attempts.labels(destination, result)
        self.forward_failed.labels(destination)
        self.forward_pending.labels(destination)
        self.forward_oldest_pending.labels(destination)

    def attempted(self, destination: str, kind: str, result: str, seconds: float) -> None:
        self.forward_attempts.labels(destination, result).inc()
        self.forward_duration.labels(kind).observe(seconds)

    # -- reported by the writer (topic_audit.writer.thread.Observer) ----------------------------------------
    def batch_committed(self, rows: list[dict[str, Any]], seconds: float, head_id: int) -> None:
        self.append_seconds.observe(seconds)
        self.batch_rows.observe(len(rows))
        self.log_entries.set(head_id)
        accepted = False
        for row in rows:
            outcome = row["outcome"]
            key = (command_label(row["callback_command"]), outcome, row["reason"] or "none")
            self._callbacks[key].inc()
            accepted = accepted or outcome == "accepted"
        if accepted:
            self.last_accepted.set(time.time())

    def batch_failed(self, count: int) -> None:
        self.append_errors.inc(count)

    def privacy_counted(self, erased: dict[str, int], oldest_content_age: float) -> None:
        """What the erasures records say (:func:`topic_audit.writer.retention.counts`)."""
        self.erased_entries.erased = dict(erased)
        self.oldest_content_age.set(max(oldest_content_age, 0.0))

    def topics_counted(self, active: int, deleted: int) -> None:
        self._topics["active"].set(active)
        self._topics["deleted"].set(deleted)
