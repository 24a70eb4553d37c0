"""The Toxiproxy-compatible fault proxy: toxics, their per-link engine and the HTTP API."""
