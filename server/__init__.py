"""Coordination server: aggregation, checkpoints, the Flower ServerApp. Holds no data."""
