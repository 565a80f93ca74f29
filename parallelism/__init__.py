"""raytron.parallelism."""
