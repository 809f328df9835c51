"""Merge methods: pure torch functions over one output tensor, and their registry."""
