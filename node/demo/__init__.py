"""The demos: a whole local swarm, the single-volunteer round trip, their text domains."""
