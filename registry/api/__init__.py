"""The HTTP API (FastAPI): thin routes that parse, call a service, and serialise."""
