"""Files and numbers, numpy only: llm.c's .bin formats, its init, the data loader, tokenizers, the built-in corpus."""
