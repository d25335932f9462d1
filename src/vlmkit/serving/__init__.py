"""Serving: an OpenAI-compatible HTTP API and a web chat page (`vlmkit serve`)."""
