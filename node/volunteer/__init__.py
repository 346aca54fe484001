"""The volunteer role: train on the head, publish deltas; its local control service."""
