"""Source identity and materialisation: local directories, demo://, the Hub."""
