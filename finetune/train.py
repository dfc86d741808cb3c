"""`finetune(...)`: a registered backbone + a new linear layer, trained end to end, scored once on test.

What happens, top to bottom: dataset -> train / validation / test rows (probe's rules) ->
backbone.net with a fresh nn.Linear at its classifier -> freeze -> param groups -> optimizer
and per-step schedule -> epochs (augmented train pass, validation pass, checkpoint) ->
restore the best-validation weights -> one test pass -> the frozen probe of the same features
(finetune.baseline) -> result JSON + training-curve PNG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from extract.compute.allocator import malloc_tuned, tune_malloc
from extract.compute.engine import default_workers, ieee_fp32, on_device, precision_name, tf32_provenance
from extract.core.errors import UserError
from extract.registry.models import build_backbone
from extract.run.plan import plan as plan_request
from extract.run.request import ExtractRequest
from probe.protocol.metrics import classification_metrics
from probe.output.results import SCHEMA, library_versions, write_result

from finetune import baseline, checkpoint, schedule
from finetune.config import TrainConfig
from finetune.data import SplitLoader
from finetune.model import Classifier, apply_freeze, make_optimizer, param_groups, set_train_mode
from finetune.plot import plot_history
from finetune.runtime import autocast, check_precision, seeded
from finetune.splits import SplitPlan, plan_splits

logger = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the last finished epoch's checkpoint is on disk."""

    def __init__(self, run_dir: Path, epochs_done: int, epochs: int):
        super().__init__(f"interrupted after {epochs_done} of {epochs} epochs")
        self.run_dir, self.epochs_done, self.epochs = run_dir, epochs_done, epochs


@dataclass
class FinetuneResult:
    result: dict                  # the result JSON's content
    path: Path                    # where the result JSON was written
    curves: Path                  # the training-curve PNG
    run_dir: Path                 # checkpoints (last.pt, best.pt)
    model: nn.Module = field(repr=False)  # the trained network, best-validation weights, on the CPU


def head_name(freeze: str, from_scratch: bool) -> str:
    """Result head name: finetune-<freeze> or scratch-<freeze> (':' of until: becomes '-')."""
    return f"{'scratch' if from_scratch else 'finetune'}-{freeze.replace(':', '-')}"


def finetune(model: str | None = None, data: str | None = None, config: TrainConfig | None = None, *,
             on_epoch_end: Callable[[int, dict, nn.Module], None] | None = None, **keywords) -> FinetuneResult:
    """Fine-tune and write a result beside probe's; see TrainConfig and `python -m finetune --help`.

    `model`, `data` and `keywords` change single fields of `config`. on_epoch_end(epoch,
    history_row, model) runs after each epoch's checkpoint is saved. Progress is logged to the
    `finetune.train` logger. The caller's global RNG states are the same afterwards. On the CPU
    glibc's malloc is tuned for the process (`extract.compute.allocator`; FEATPROBE_MALLOC_TUNING=0
    turns that off).
    """
    given = {k: v for k, v in (("model", model), ("data", data)) if v is not None}
    c = (config or TrainConfig()).replace(**given, **keywords)
    (data, freeze, epochs, batch_size, optimizer, momentum, sched, warmup_epochs, label_smoothing, seed,
     val_fraction, workers, progress) = (c.data, c.freeze, c.epochs, c.batch_size, c.optimizer, c.momentum,
                                         c.sched, c.warmup_epochs, c.label_smoothing, c.seed, c.val_fraction,
                                         c.workers, c.progress)
    lr, weight_decay, head_lr_mult, from_scratch = c.learning_rate, c.decay, c.head_lr_mult, c.from_scratch
    features = plan_request(ExtractRequest(
        model=c.model, data=c.data, weights="none" if from_scratch else c.weights, root=c.root,
        download=c.download, dataset_options=c.dataset_options, device=c.device, precision=c.precision,
        image_size=c.image_size))
    identity, dataset, spec = features.identity, features.dataset, features.weights.spec
    weights_id = features.weights.tag
    from_scratch = from_scratch or weights_id == "none"   # --weights none is the same baseline
    if head_lr_mult is None:  # the new layer learns faster only on top of pretrained features
        head_lr_mult = 1.0 if from_scratch else 10.0
    plan = plan_splits(dataset, seed=seed, val_fraction=val_fraction, test_fraction=c.test_fraction,
                       split_seed=c.split_seed)
    dev, amp = features.device, features.autocast
    check_precision(amp, dev)
    if dev.type == "cpu":
        tune_malloc()   # keep freed activation buffers in the heap (extract.compute.allocator)
    head = head_name(freeze, from_scratch)
    run_dir = identity.results_dir(c.runs_dir, head)

    # the run's own RNG stream (the caller's is restored on exit); cuda:N current; fp32 on CUDA without TF32
    with seeded(seed, dev), on_device(dev), ieee_fp32(dev, amp):
        backbone = build_backbone(features.weights)
        n_classes = len(dataset.classes)
        net = Classifier(backbone.net, backbone.head_path, backbone.dims["penultimate"], n_classes,
                         embed=backbone.spec.embed, reset=backbone.spec.family == "timm")
        frozen = apply_freeze(net, freeze, backbone.module_for)
        channels_last = dev.type == "cuda"
        net.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)

        in_memory = plan.train.source.arrays is not None
        eval_pre = identity.preprocess
        workers = (0 if in_memory else default_workers(dev)) if workers is None else workers
        loaders = {role: SplitLoader(part.source, part.indices, preprocess=eval_pre, train=role == "train",
                                     batch_size=batch_size, seed=seed, workers=workers, device=dev,
                                     channels_last=channels_last)
                   for role, part in (("train", plan.train), ("val", plan.val), ("test", plan.test))}
        steps_per_epoch = len(loaders["train"])
        groups = param_groups(net, lr=lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult)
        group_info = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                       "parameters": sum(p.numel() for p in g["params"])} for g in groups]
        opt = make_optimizer(groups, optimizer, lr=lr, momentum=momentum)
        scheduler = schedule.make_scheduler(opt, name=sched, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                            warmup_epochs=warmup_epochs)
        scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

        hyper = {"model": spec.name, "weights": weights_id, "dataset": dataset.identity, "freeze": freeze,
                 "from_scratch": from_scratch, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
                 "lr": lr, "head_lr_mult": head_lr_mult, "momentum": momentum if optimizer == "sgd" else None,
                 "weight_decay": weight_decay, "sched": sched, "warmup_epochs": warmup_epochs,
                 "label_smoothing": label_smoothing, "seed": seed, "val_fraction": val_fraction,
                 **({"test_fraction": c.test_fraction, "split_seed": c.split_seed} if plan.test_carve else {}),
                 "precision": precision_name(amp), "sizes": _sizes(plan),
                 "fingerprints": {name: src.fingerprint() for name, src in dataset.splits.items()}}
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        total = sum(p.numel() for p in net.parameters())
        state = checkpoint.start_or_resume(run_dir, hyper, c.resume, net, opt, scheduler, scaler, dev)
        logger.info(f"fine-tuning {spec.name} ({weights_id}) on {identity.data.label}: {head}, "
                    f"{trainable:,} of {total:,} parameters trained, {len(plan.train.indices)} train / "
                    f"{len(plan.val.indices)} val images, {dev} {precision_name(amp)}; checkpoints in {run_dir}")
        logger.info(f"test: {plan.describe_test()['description']}")
        history, best = state["history"], state["best"]
        skipped: dict[str, dict[int, str]] = {"train": {}, "val": {}, "test": {}}
        try:
            for epoch in range(state["epoch"] + 1, epochs + 1):
                t0 = time.perf_counter()
                loaders["train"].set_epoch(epoch)
                tr = train_epoch(net, loaders["train"], opt, scheduler, scaler, loss_fn, dev, amp, frozen,
                                 skipped["train"], progress=progress, desc=f"epoch {epoch}/{epochs}")
                va = evaluate(net, loaders["val"], dev, amp, skipped["val"])
                row = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"], "val_loss": va["loss"],
                       "val_top1": va["top1"], "lr": lr * schedule.lr_scale(scheduler),
                       "seconds": round(time.perf_counter() - t0, 3), "images_per_second": tr["images_per_second"]}
                history.append(row)
                improved = best is None or \
                    (row["val_top1"], -row["val_loss"]) > (best["val_top1"], -best["val_loss"])
                if improved:
                    best = {"epoch": epoch, "val_top1": row["val_top1"], "val_loss": row["val_loss"]}
                checkpoint.save_epoch(run_dir, epoch=epoch, config=hyper, model=net, optimizer=opt,
                                      scheduler=scheduler, scaler=scaler, history=history, best=best,
                                      improved=improved, device=dev)
                logger.info(f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} "
                            f"top-1 {row['train_top1']:.2%}, val loss {row['val_loss']:.4f} "
                            f"top-1 {row['val_top1']:.2%} ({row['seconds']:.1f} s)")
                if on_epoch_end is not None:
                    on_epoch_end(epoch, row, net)
        except KeyboardInterrupt:
            raise Interrupted(run_dir, len(history), epochs) from None

    best_state = checkpoint.load(run_dir / checkpoint.BEST)
    net.load_state_dict(best_state["model"])
    t0 = time.perf_counter()
    try:
        with on_device(dev), ieee_fp32(dev, amp):
            te = evaluate(net, loaders["test"], dev, amp, skipped["test"], keep_scores=True)
    except KeyboardInterrupt:
        raise Interrupted(run_dir, len(history), epochs) from None
    predict_seconds = time.perf_counter() - t0
    _warn_skipped(skipped, plan)
    metrics = classification_metrics(te["y"], te["scores"].argmax(1), te["scores"] if n_classes > 5 else None,
                                     classes=list(dataset.classes))
    test = plan.describe_test(len(skipped["test"]))
    frozen_probe = baseline.compare(metrics["top1"], identity, test, c.results_dir,
                                    baseline.probe_command(c, carved=plan.test_carve is not None,
                                                           model=identity.model))
    result = {
        "schema": SCHEMA, "kind": "finetune", "head": head,
        "description": ("random init, " if from_scratch else "") + f"end-to-end fine-tuning, freeze {freeze}",
        "dataset": identity.data.label, "model": identity.model, "identity": identity.to_dict(),
        "precision": identity.precision, "dtype": identity.dtype,
        "layer": "penultimate", "metrics": metrics,
        "hyperparameters": {k: v for k, v in hyper.items()
                            if k not in ("model", "weights", "dataset", "sizes", "fingerprints")},
        "param_groups": group_info,
        "grid": [], "epochs": epochs, "best_epoch": best_state["epoch"],
        "schedule": schedule.describe(name=sched, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                      warmup_epochs=warmup_epochs, base_lr=lr),
        "history": history,
        "timing": {"fit_seconds": round(sum(h["seconds"] for h in history), 4),
                   "predict_seconds": round(predict_seconds, 4)},
        "sizes": _sizes(plan, skipped), "validation": plan.validation + "; best epoch by validation top-1",
        "test_split": plan.test_split, "test": test, "classes": list(dataset.classes),
        "frozen_probe": frozen_probe,
        "skipped": {k: len(v) for k, v in skipped.items()},
        "trainable_parameters": trainable, "parameters": total,
        "provenance": {**backbone.provenance(), "dataset": dataset.name, "dataset_identity": dataset.identity,
                       "dataset_fingerprints": hyper["fingerprints"], "eval_preprocess": eval_pre.as_dict(),
                       "device": str(dev), **tf32_provenance(dev, amp), "run_dir": str(run_dir),
                       "malloc_tuning": malloc_tuned()},
        "versions": {**library_versions(), "torchvision": _torchvision_version()},
        "seed": seed, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_result(result, c.results_dir)
    curves = plot_history(history, path.with_name(f"{path.stem}.curves.png"),
                          title=f"{head} · {identity.data.label} · {identity.model}", best_epoch=best_state["epoch"])
    logger.info(f"test top-1 {metrics['top1']:.2%} (best epoch {best_state['epoch']} of {epochs}); result: {path}")
    return FinetuneResult(result, path, curves, run_dir, net.cpu())


def train_epoch(net, loader: SplitLoader, opt, scheduler, scaler, loss_fn, dev, amp, frozen: set[str],
                skipped: dict, *, progress: bool = True, desc: str = "") -> dict:
    """One pass over the training rows; returns mean loss, top-1 and images/s."""
    set_train_mode(net, frozen)
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=loader.n_images, desc=desc, unit="img", disable=None if progress else True,
               dynamic_ncols=True, leave=False)
    try:
        for batch in loader:
            skipped.update(batch.skipped)
            bar.update(len(batch.skipped))
            if batch.x is None:
                continue
            with autocast(dev, amp):
                logits = net(batch.x)
            loss = loss_fn(logits.float(), batch.y)
            if not torch.isfinite(loss):
                raise UserError(f"training diverged (loss {loss.item()}) in {desc}; lower --lr")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            scheduler.step()
            n = len(batch.y)
            loss_sum += loss.item() * n
            correct += int((logits.argmax(1) == batch.y).sum())
            seen += n
            bar.update(n)
            rate = seen / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix_str(f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f} {rate:.1f} img/s",
                                refresh=False)
    finally:
        bar.close()
    if seen == 0:
        raise UserError("no training image could be read")
    return {"loss": loss_sum / seen, "top1": correct / seen,
            "images_per_second": round(seen / max(1e-9, time.perf_counter() - t0), 2)}


@torch.no_grad()
def evaluate(net, loader: SplitLoader, dev, amp, skipped: dict, *, keep_scores: bool = False) -> dict:
    """Eval-mode pass: mean cross-entropy and top-1; with keep_scores also softmax scores (N, C) and labels."""
    net.eval()
    loss_sum, correct, seen, scores, labels = 0.0, 0, 0, [], []
    for batch in loader:
        skipped.update(batch.skipped)
        if batch.x is None:
            continue
        with autocast(dev, amp):
            logits = net(batch.x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, batch.y, reduction="sum").item()
        correct += int((logits.argmax(1) == batch.y).sum())
        seen += len(batch.y)
        if keep_scores:
            scores.append(logits.softmax(1).cpu().numpy())
            labels.append(batch.y.cpu().numpy())
    if seen == 0:
        raise UserError("no evaluation image could be read")
    out = {"loss": loss_sum / seen, "top1": correct / seen}
    if keep_scores:
        out.update(scores=np.concatenate(scores), y=np.concatenate(labels))
    return out


def _sizes(plan: SplitPlan, skipped: dict | None = None) -> dict:
    skipped = skipped or {}
    return {role: int(len(getattr(plan, role).indices) - len(skipped.get(role, {})))
            for role in ("train", "val", "test")}


def _warn_skipped(skipped: dict, plan: SplitPlan) -> None:
    for role, found in skipped.items():
        if found:
            source = getattr(plan, role).source
            shown = "; ".join(f"{Path(source.paths[i]).name if source.paths else i}: {r}"
                              for i, r in list(found.items())[:3])
            logger.warning(f"skipped {len(found)} unreadable {role} image(s) ({shown}"
                + (" ..." if len(found) > 3 else "") + ")")


def _torchvision_version() -> str:
    import torchvision
    return torchvision.__version__
