"""Developer tools that are not part of the product: a local MongoDB replica set."""
