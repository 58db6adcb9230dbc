"""Integrations with other model libraries (app level: may import any lancet package)."""
