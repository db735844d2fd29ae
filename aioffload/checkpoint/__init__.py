"""Hugging Face folders: config and tensors (safetensors), tokenizer and chat template."""
