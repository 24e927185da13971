"""Training: flags to a frozen Run (run), the loop (loop), the jitted step, AdamW, sharding, checkpoints, main.log."""
