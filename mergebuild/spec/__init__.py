"""The Mergefile: line-numbered YAML, typed specs, validation, the DAG, mergekit import."""
