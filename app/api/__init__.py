"""HTTP API and console server."""
