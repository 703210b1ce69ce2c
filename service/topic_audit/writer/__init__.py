"""The writer, sole owner of the write connection: its requests and jobs, the append transaction, group commit, the wire format, its thread form and its client, and the timers that run on it."""
