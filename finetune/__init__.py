"""End-to-end fine-tuning of a registered backbone, reported beside the frozen-feature probes."""

from finetune.train import FinetuneResult, finetune

__all__ = ["finetune", "FinetuneResult"]
