"""Observability: Prometheus metrics, the health/metrics HTTP server, structured logs."""
