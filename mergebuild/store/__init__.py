"""The content-addressed store: objects, locks, refs, pins, garbage collection."""
