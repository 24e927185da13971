"""The op library: llm.c layers as custom_vjp ops (ops), the kernel choice and op sets (kernels), the KV cache."""
