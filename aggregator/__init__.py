"""Aggregator peers: gather deltas, merge them into the next base, publish it."""
