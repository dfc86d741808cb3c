"""Classical heads on cached frozen-backbone embeddings: select on validation, refit, test once."""

from probe.heads.catalog import HEADS, Head, get_head, list_heads
from probe.heads.knn import KNNClassifier
from probe.protocol.metrics import classification_metrics
from probe.protocol.search import run_probe, search
from probe.output.headfile import SklearnVersionWarning, load_head, save_head
from probe.output.results import load_results, write_result
from probe.protocol.splits import validation_mask

__all__ = ["HEADS", "Head", "get_head", "list_heads", "KNNClassifier", "classification_metrics", "run_probe",
           "search", "write_result", "load_results", "save_head", "load_head", "SklearnVersionWarning",
           "validation_mask"]
