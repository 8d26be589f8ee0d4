"""Kubernetes API access."""
