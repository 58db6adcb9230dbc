"""The timeline simulator of a step graph, and the interval arithmetic it shares with measurement."""
