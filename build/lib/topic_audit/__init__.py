"""topic-audit: the audited webhook target for Tencent Cloud Chat topic callbacks."""
