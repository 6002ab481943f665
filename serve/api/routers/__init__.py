"""The server's routes, one router per audience: OpenAI clients, operators, probes."""
