"""`python -m finetune`: command line -> finetune(...) keyword arguments -> one-line summary."""

from __future__ import annotations

import argparse
import shlex
import sys

from extract.cli import parse_options
from extract.core.errors import guarded
from extract.core.helpformat import DefaultsHelp

from finetune.baseline import hint
from finetune.data import CROP_SCALE
from finetune.model import FREEZE_HELP
from finetune.config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, OPTIMIZERS, TrainConfig
from finetune.train import Interrupted, finetune


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune", formatter_class=DefaultsHelp,
        description="Train a registered backbone with a new classification layer end to end; the result lands "
                    "beside the frozen-feature probes in `python -m probe --report`.")
    p.add_argument("--model", default="efficientnet_lite0", help="backbone name (python -m extract --list-models)")
    p.add_argument("--weights", default="default",
                   help="weights tag (e.g. IMAGENET1K_V2, swav), 'none' for random init, or a local checkpoint file")
    p.add_argument("--from-scratch", action="store_true",
                   help="same architecture, random init (the baseline pretrained weights are compared against; "
                        "the same as --weights none)")
    p.add_argument("--data", default="digits", help="dataset name (python -m extract --list-datasets)")
    p.add_argument("--root", help="dataset folder (imagefolder: the folder with train/val/test or class folders)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download torchvision datasets that are not on disk")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. --option n=500 for the synthetic set")
    g = p.add_argument_group("training")
    g.add_argument("--freeze", default="none", metavar="SPEC",
                   help=f"{FREEZE_HELP}: train everything, only the new layer, or from <layer> (a tap such as "
                        "layer4 or fc6, or a module path) onward (default: none)")
    g.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="passes over the training rows")
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="images per optimizer step")
    g.add_argument("--optimizer", default=TrainConfig.optimizer, choices=list(OPTIMIZERS),
                   help="sgd (with --momentum) or adamw")
    g.add_argument("--lr", type=float,
                   help="base learning rate of the backbone (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--head-lr-mult", type=float,
                   help="learning-rate multiplier of the new layer (default: 10, or 1 for random init)")
    g.add_argument("--momentum", type=float, default=TrainConfig.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float,
                   help="weight decay (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHT_DECAY.items())
                        + "), never on biases and normalisation weights")
    g.add_argument("--sched", default="cosine", choices=["step", "cosine"],
                   help="per-step cosine decay, or x0.1 after 50%% and 75%% of the training steps (default: cosine)")
    g.add_argument("--warmup-epochs", type=int, default=1, help="linear warmup epochs (default: 1)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="default: 0")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds init, shuffling, augmentation and (as in probe) the carved validation split")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of train used for validation when the dataset has no own val split (default: 0.2)")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of train carved as test rows when the dataset has only a train split (a folder of "
                        "class folders), as probe carves them (default: 0.2)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of that test carve, apart from --seed as in probe (default: 0)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue the run's last checkpoint (--no-resume: start over)")
    r = p.add_argument_group("runtime and output")
    r.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 where the hardware has it, fp16 on older GPUs, else fp32")
    r.add_argument("--image-size", metavar="N",
                   help="input side in pixels (8-1024); default: the weights' own crop size")
    r.add_argument("--workers", type=int, help="DataLoader workers for image files (default: by device and cores)")
    r.add_argument("--results-dir", default="results", help="result JSON root shared with probe (default: results)")
    r.add_argument("--runs-dir", default="runs", help="checkpoint root (default: runs)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.epilog = (f"Training images get RandomResizedCrop (area {CROP_SCALE[0]:g}-{CROP_SCALE[1]:g}) to the "
                "backbone's crop size and a horizontal flip; validation and test use its eval preprocessing. "
                "The run ends by comparing its test top-1 with the best frozen probe of the same features and "
                "test rows under --results-dir, or with the commands that make one.")
    return p


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run."""
    kept = [a for a in argv if a not in ("--resume", "--no-resume")]
    return shlex.join(["python", "-m", "finetune", *kept, "--resume"])


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        out = finetune(config=TrainConfig(
            model=args.model, data=args.data, weights=args.weights, root=args.root, download=args.download,
            dataset_options=parse_options(args.option), freeze=args.freeze, from_scratch=args.from_scratch,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr_mult=args.head_lr_mult,
            optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay, sched=args.sched,
            warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, seed=args.seed,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed,
            precision=args.precision, device=args.device, workers=args.workers,
            results_dir=args.results_dir, runs_dir=args.runs_dir, resume=args.resume, progress=args.progress,
            image_size=args.image_size))
    except Interrupted as e:
        if e.epochs_done:
            print(f"error: interrupted after {e.epochs_done} of {e.epochs} epochs; the checkpoint is in "
                  f"{e.run_dir}. Continue with:\n  {resume_command(argv)}", file=sys.stderr)
        else:
            print("error: interrupted during the first epoch, before any checkpoint; "
                  "rerun the same command to start again", file=sys.stderr)
        return 130
    m = out.result["metrics"]
    print(f"{out.result['head']}: test top-1 {m['top1']:.2%}, balanced {m['balanced_accuracy']:.2%}, macro-F1 "
          f"{m['macro_f1']:.2%} (best epoch {out.result['best_epoch']}; test: {out.result['test']['description']})")
    print(f"  wrote {out.path}\n  curves: {out.curves}")
    line = hint(out.result.get("frozen_probe"), m["top1"])
    if line:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    return guarded(lambda: run(args, argv), ("extract", "probe", "finetune"))
