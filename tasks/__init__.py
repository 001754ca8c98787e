"""Prefect tasks: one library call each, plus retries, timeouts, cache policy and tags."""
