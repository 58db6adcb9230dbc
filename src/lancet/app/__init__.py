"""The command line, the jobs each rank runs for it (train, bench, profile, inspect), run configuration and data."""
