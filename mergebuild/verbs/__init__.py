"""Verify, reproduce, export and push: verbs that take collaborators, not the facade."""
