"""raytron.ops."""
