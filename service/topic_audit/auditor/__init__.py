"""The auditors' screens: Datasette over the live database, read-only."""
