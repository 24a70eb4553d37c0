"""Chaos runs: scenarios of faults against real runs, their invariants and reports, soak runs;
the Toxiproxy-compatible fault proxy is the stand-alone `chaos.toxiproxy` subpackage."""
