"""Datasette configuration of topic-audit explore (metadata, templates), shipped as package data."""
