"""What every peer daemon shares: its lifecycle, metrics, logs and crash points."""
