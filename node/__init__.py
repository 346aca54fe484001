"""The volunteer node: joins a swarm, trains on local data, publishes deltas."""
