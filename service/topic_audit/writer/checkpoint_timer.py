"""The checkpoint timer: under ``serve`` one owner, the supervisor, however many receivers run and
restart (theirs are off); the app alone (:func:`topic_audit.receiver.app.create_app` without ``serve``:
tests, tools) runs one of its own for its lifetime.

Every ``checkpoint_seconds`` (and once more on the way out, after the receivers have committed their
last answers) a thread signs the head of the log on a write connection of its own, under SQLite's write
lock (:func:`topic_audit.writer.signer.checkpoint`): the head it signs is a committed one whichever process
appended it, and everything added since the last checkpoint is verified first -- what does not verify
is never signed (logged at every tick; ``topic_audit_checkpoint_age_seconds`` grows).
"""

from __future__ import annotations

import logging
import threading

from topic_audit import clock
from topic_audit.settings import Settings
from topic_audit.transparency.checkpoints import Signer
from topic_audit.writer.signer import Refused, boundaries_unsigned, checkpoint
from topic_audit.writer.thread import connect

log = logging.getLogger("topic_audit.checkpoints")


class CheckpointTimer:
    def __init__(self, settings: Settings, at_start: bool = True) -> None:
        self.settings = settings
        self.at_start = at_start
        """Sign at once, at start, when the log has boundaries no checkpoint covers yet (``serve``); the
        app alone waits for its first tick."""
        self.interval = settings.checkpoint_seconds
        """Seconds between checkpoints (0: none); a reload may change it."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signer: Signer | None = None

    def start(self) -> None:
        if self.interval == 0:
            return
        self._signer, created = Signer.load_or_create(self.settings.signing_key_path)
        if created:
            log.warning(
                "created checkpoint signing key %s (0600); export its public key with `topic-audit "
                "public-key` and keep it where the auditors are",
                self.settings.signing_key_path,
            )
        self._thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking, and sign a last checkpoint (everything answered so far is in it)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.sign()

    def sign(self) -> None:
        assert self._signer is not None
        settings = self.settings
        conn = connect(settings.db, autocheckpoint=settings.replica_url is None)
        try:
            checkpoint(
                conn, self._signer, settings.checkpoint_path, clock.now(), origin=settings.log_origin_name
            )
        except Refused as exc:
            log.error("%s; serving on, signing nothing until it is resolved", exc)
        except Exception:
            log.exception("could not write a checkpoint; will retry")
        finally:
            conn.close()

    def _boundaries_unsigned(self) -> bool:
        conn = connect(self.settings.db, autocheckpoint=self.settings.replica_url is None)
        try:
            return boundaries_unsigned(conn, self.settings.checkpoint_path)
        finally:
            conn.close()

    def _run(self) -> None:
        if self.at_start and self._boundaries_unsigned():
            self.sign()  # the boundaries a migration fixed are signed at once, not a tick later
        while not self._stop.wait(self.interval or 1):
            if self.interval:
                self.sign()
