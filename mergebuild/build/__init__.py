"""Doing: job assembly, compatibility, the tensor table, the streaming engine, vocab."""
