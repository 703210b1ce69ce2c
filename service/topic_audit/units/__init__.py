"""systemd unit files shipped with the package (``topic-audit units --to DIR`` writes them)."""
