"""Plans: the passes' decisions as files, the optimizer that chooses them, and the artifact format."""
