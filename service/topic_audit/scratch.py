"""The temporary folders of ``serve`` (the writer's socket, the metrics of every process, Litestream's
configuration; beside the log, a cluster writer's takeover): each named for the process that made it,
and those of a ``serve`` that died without removing its own (``kill -9``, a lost machine) removed when
the next one starts."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("topic_audit.serve")

PREFIX = "topic-audit-"
_OURS = re.compile(rf"{PREFIX}(?:[a-z]+-)?(\d+)-")


def folder(kind: str) -> str:
    """A new private folder (0700) for ``kind`` (``writer``, ``metrics``, ``litestream``), named for this
    process: ``topic-audit-<kind>-<pid>-<random>``."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_leftovers(root: Path | None = None) -> list[Path]:
    """Remove this user's folders made by processes that no longer run; the folders removed."""
    root = root or Path(tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{PREFIX}*"):
        found = _OURS.match(path.name)
        if not found or not path.is_dir() or path.is_symlink():
            continue
        try:
            mine = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and not _alive(int(found[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary folders left by processes that died: %s", len(removed), removed)
    return removed
