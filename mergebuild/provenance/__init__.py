"""What a build records: in-toto statements, lineage, integrity, model cards."""
