"""Serving many generations at once: continuous batching (scheduler.py)."""
