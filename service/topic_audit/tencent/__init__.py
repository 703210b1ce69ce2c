"""Tencent's side of a callback, pure: the payloads, the checks in the contract's order, documented samples and signed URLs. No I/O."""
