"""finetune's defaults: the small-data recipe."""

from __future__ import annotations

from finetune.cli import parser
from finetune.config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, TrainConfig


def test_defaults_are_the_small_data_recipe_and_help_states_them():
    c = TrainConfig()
    assert (c.optimizer, c.epochs, c.sched, c.warmup_epochs, c.freeze) == ("sgd", 5, "cosine", 1, "none")
    assert c.learning_rate == DEFAULT_LR["sgd"] == 1e-3 and c.decay == DEFAULT_WEIGHT_DECAY["sgd"] == 1e-4
    assert c.momentum == 0.9 and c.head_lr_mult is None
    assert DEFAULT_LR["adamw"] == 1e-4 and DEFAULT_WEIGHT_DECAY["adamw"] == 0.05
    args = parser().parse_args([])
    for name in ("optimizer", "epochs", "batch_size", "sched", "warmup_epochs", "momentum", "freeze",
                 "label_smoothing", "val_fraction", "test_fraction", "split_seed", "seed", "lr", "weight_decay",
                 "head_lr_mult"):
        assert getattr(args, name) == getattr(c, name), name
    text = " ".join(parser().format_help().split())
    for said in ("training rows (default: 5)", "sgd (with --momentum) or adamw (default: sgd)",
                 "(default: sgd 0.001, adamw 0.0001)", "weight decay (default: sgd 0.0001, adamw 0.05)",
                 "(default: 10, or 1 for random init)", "(default: cosine)", "warmup epochs (default: 1)",
                 "optimizer step (default: 32)", "SGD momentum (default: 0.9)"):
        assert said in text, said

