"""Deciding: the canonical recipe and key, staleness with reasons, the lock file."""
