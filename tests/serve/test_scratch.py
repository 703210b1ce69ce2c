"""serve's temporary folders: a dead serve's are removed when the next starts; a running one's, another
user's and anything else in the temporary folder are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from topic_audit import scratch


def test_a_dead_process_folders_go_and_the_rest_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = subprocess.run(
        [sys.executable, "-c", "from topic_audit import scratch; print(scratch.folder('metrics'))"],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        check=True,
    ).stdout.strip()
    dead = Path(made)
    (dead / "counter_1.db").write_bytes(b"x")
    alive = Path(scratch.folder("writer"))
    other = tmp_path / "topic-audit-notes"
    other.mkdir()
    legacy = tmp_path / "topic-audit-k2j3h4"
    legacy.mkdir()
    assert dead.parent == tmp_path and dead.name.startswith("topic-audit-metrics-")
    assert oct(alive.stat().st_mode & 0o777) == "0o700"

    assert scratch.remove_leftovers() == [dead]
    assert not dead.exists() and alive.is_dir() and other.is_dir() and legacy.is_dir()
