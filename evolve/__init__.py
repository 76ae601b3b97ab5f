"""evolve: CMA-ES search over merge recipes, scored with lm-eval."""
