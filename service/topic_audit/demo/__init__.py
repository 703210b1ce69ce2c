"""Stand-ins to see topic-audit work: the demo handler (sink) and steady traffic (send --rate)."""
