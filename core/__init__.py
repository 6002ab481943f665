"""What every package shares: the error hierarchy, the user cache and its locks, base models and fingerprints."""
