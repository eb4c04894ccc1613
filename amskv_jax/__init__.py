"""amskv_jax: VAR (visual autoregressive next-scale prediction) in JAX/Flax with AMS-KV, a scale-adaptive KV cache.

Start with `amskv_jax.generate.generate` (or `python -m amskv_jax.generate`), `amskv_jax.policies` for cache
policies and `amskv_jax.checkpoint.load_model` for weights.
"""
