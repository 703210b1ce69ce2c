"""The transparency log: RFC 9162 Merkle maths, hash tiles, C2SP signed notes, signed checkpoints, receipts and their offline checks."""
