"""The monitor role: the swarm's state as one view, served as metrics."""
