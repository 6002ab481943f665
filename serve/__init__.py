"""The adapter server: one base model, many adapters per request."""
