"""Built-in demos that run offline on a CPU."""
