"""`adapters serve --replicas N`: engine replicas on Ray Serve behind the same HTTP API."""
