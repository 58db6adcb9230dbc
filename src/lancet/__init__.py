"""lancet: whole-step all-to-all/compute overlap for Mixture-of-Experts training."""

__version__ = "0.1.0"
