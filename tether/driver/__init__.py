"""The run driver: starts a run's members, watches and restarts them, evaluates, summarises."""
