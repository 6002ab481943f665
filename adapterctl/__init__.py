"""The `adapters` command: assembles the registry, training and serving commands."""
