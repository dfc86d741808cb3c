"""Shared infrastructure that knows nothing of who imports it: the user-facing error and atomic writes."""
