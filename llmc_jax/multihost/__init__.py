"""Several processes: jax.distributed start-up (distributed) and the watch that stops a run whose peer died."""
