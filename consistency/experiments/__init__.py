"""Consistency sweeps over mode/staleness/workers/stragglers: analysis, plots, reports, CLI."""
