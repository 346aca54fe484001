"""The swarm's network: DHT membership and signed records, framed streams, the blob
store and the blob exchange."""
