"""MALLOC: memory-aware long-sequence compression for large sequential recommenders."""

__version__ = "0.1.0"
