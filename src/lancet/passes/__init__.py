"""Graph passes over a captured training step."""
