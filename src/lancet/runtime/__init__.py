"""Running a step: process groups and launching ranks, executors of captured graphs."""
