"""Evaluation: CTR and retrieval metrics, fidelity against the uncompressed model."""
