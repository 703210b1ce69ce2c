"""``serve``: every process and its supervision -- the one place that composes the other packages."""
