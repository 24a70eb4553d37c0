"""What every member process (shard or worker) runs beside its work: the heartbeat thread."""
