"""mergebuild: make for model merges."""

__version__ = "0.1.0"

# Bumped whenever a change to the engine or a method changes output bytes for an
# unchanged recipe; it is part of every key, so old builds become stale.
ENGINE_VERSION = "3"
