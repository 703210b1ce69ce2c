"""``serve --env-file``: settings kept in a file, read at start and again at every reload.

The format is systemd's ``EnvironmentFile=`` (``NAME=value`` lines, ``#`` comments, optional quotes,
an optional ``export``), so that one file serves both. Its values win over the environment ``serve``
was started with; a line removed from the file is gone at the next reload (the started-with value, if
any, comes back).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from topic_audit.settings import SettingsError

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def parse(text: str, name: str = "the environment file") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = _LINE.match(line)
        if match is None:
            raise SettingsError(f"{name} line {number}: expected NAME=value, got {line[:60]!r}")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


class EnvFile:
    """Applies the file to ``os.environ``, undoing what the previous reading applied."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._started_with = dict(os.environ)
        self._applied: set[str] = set()

    def apply(self) -> None:
        try:
            values = parse(self.path.read_text(encoding="utf-8"), str(self.path))
        except OSError as exc:
            raise SettingsError(f"TOPIC_AUDIT_ENV_FILE: cannot read {self.path}: {exc.strerror}") from None
        for key in self._applied - values.keys():
            if key in self._started_with:
                os.environ[key] = self._started_with[key]
            else:
                os.environ.pop(key, None)
        os.environ.update(values)
        self._applied = set(values)
