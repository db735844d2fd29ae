"""Attention backends, paged kernels and the paged KV cache."""
