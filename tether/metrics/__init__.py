"""Prometheus metrics of every member (DESIGN §13): `buckets` holds what the members count at
event time, `collect` the metric families, the collectors that read them at scrape time and the
`/metrics` endpoint."""
