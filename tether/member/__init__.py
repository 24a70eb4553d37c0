"""What every member process (shard or worker) runs beside its work -- the heartbeat thread --
and its record in the store: what members publish (`report`) and how a record is read (`view`)."""
