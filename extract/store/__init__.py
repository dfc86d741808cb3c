"""The feature store: identities, cache files, chunks of unfinished runs, and what a cache folder holds."""
