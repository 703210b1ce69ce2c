"""Forgetting: erasure and its signed records, the data subjects' selectors, the projection without the content, the purge of the files."""
