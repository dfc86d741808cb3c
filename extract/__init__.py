"""Frozen-backbone embeddings, cached to HDF5."""

__version__ = "0.1.0"

from extract.store.cache import Features, iter_rows, load_features  # noqa: E402
from extract.store.catalog import feature_sets, find_caches  # noqa: E402
from extract.store.identity import DataRef, FeatureIdentity  # noqa: E402

__all__ = ["extract", "load_features", "iter_rows", "find_caches", "feature_sets", "Features", "FeatureIdentity",
           "DataRef", "__version__"]


def __getattr__(name):
    # Importing the extraction API pulls in torch; reading a cache should not.
    if name == "extract":
        from extract.api import extract
        return extract
    raise AttributeError(name)
