"""Training a model: data, the trainer, short fine-tunes, the genesis models."""
