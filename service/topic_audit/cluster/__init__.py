"""Cluster mode: no single point of failure. Receivers answer once the JetStream intake has stored a
callback on a quorum; one writer at a time, holding the lease, applies the intake to the log in its order,
each message exactly once (docs/cluster.md)."""
