"""raytron.launcher."""
