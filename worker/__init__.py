"""JAX worker: models, data, shard client and the pull-compute-push loop."""
