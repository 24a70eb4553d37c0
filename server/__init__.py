"""Parameter-server shard: sans-I/O state machine, optimizer, gRPC servicer, process."""
