"""Chaos runs (fault proxy, scenarios, invariants) are built on top of recovery; empty yet."""
