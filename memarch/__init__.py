"""memarch: memory-augmented neural architectures in JAX/Flax."""
