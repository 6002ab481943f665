"""The adapter repository: versions, stages, remotes, and the `adapters` command line."""
