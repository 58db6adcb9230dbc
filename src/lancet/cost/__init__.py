"""Costs: per-node compute profiles, collective curves, and the cost-model interface."""
