"""Tracing a training step into one fx graph."""
