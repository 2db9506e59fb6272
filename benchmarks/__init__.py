"""Measurements: federation overhead against centralised and all-reduce training."""
