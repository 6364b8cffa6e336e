"""Benchmarks: ratios of our time to an anchor's time on the same work, measured in one run."""
