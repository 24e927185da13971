"""Model families: the interface and loader (family), GPT-2 (gpt2, its autodiff oracle gpt2_reference, config)."""
