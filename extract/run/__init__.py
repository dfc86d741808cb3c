"""Turning a request into cache files: planning, the split jobs, and the runners that compute chunks."""
