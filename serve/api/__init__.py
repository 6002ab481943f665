"""The HTTP API: OpenAI-compatible routes, operator routes, tenants, metrics; engines only through their contract."""
