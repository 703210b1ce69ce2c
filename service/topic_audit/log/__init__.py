"""The audit log's SQL, on a connection it is given: schema, chain, commitments, the topics projection, rollups, full-text indexes."""
