"""The chain of heads: following the head every role agrees on, and the bases it names."""
