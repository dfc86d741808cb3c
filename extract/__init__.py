"""Frozen-backbone embeddings, cached to HDF5."""

from extract.core.version import __version__
from extract.store.cache import Features, iter_rows
from extract.store.catalog import CacheQuery, feature_sets, find_caches, load_features
from extract.store.identity import DataRef, FeatureIdentity

__all__ = ["extract", "load_features", "CacheQuery", "iter_rows", "find_caches", "feature_sets", "Features", "FeatureIdentity",
           "DataRef", "__version__"]


def __getattr__(name):
    # Importing the extraction API pulls in torch; reading a cache should not.
    if name == "extract":
        from extract.api import extract
        return extract
    raise AttributeError(name)
