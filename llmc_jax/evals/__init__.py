"""Evaluation: KV-cache generation (generate) and HellaSwag scoring (hellaswag)."""
