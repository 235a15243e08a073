"""Files for the benchmark's stock reference archives (what a user would have without us)."""
