"""Classical heads on cached frozen-backbone embeddings: select on validation, refit, test once."""

from .heads import HEADS, Head, get_head, list_heads
from .knn import KNNClassifier
from .metrics import classification_metrics
from .protocol import run_probe, search
from .results import SklearnVersionWarning, load_head, load_results, save_head, write_result
from .splits import validation_mask

__all__ = ["HEADS", "Head", "get_head", "list_heads", "KNNClassifier", "classification_metrics", "run_probe",
           "search", "write_result", "load_results", "save_head", "load_head", "SklearnVersionWarning",
           "validation_mask"]
