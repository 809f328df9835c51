"""Bytes at the edge: safetensors, Hugging Face directory layout, LoRA adapters, hashing."""
