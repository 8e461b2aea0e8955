"""Serving every user\x27s own module from one process: an OpenAI-compatible HTTP server."""
