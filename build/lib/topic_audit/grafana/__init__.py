"""Grafana provisioning, dashboard and alert rules of topic-audit, shipped as package data."""
