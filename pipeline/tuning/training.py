"""The training loop shared by fine-tuning and the from-scratch baseline.

Images are decoded once (with the same robust decoder as extraction) into uint8 arrays held in
memory; each epoch augments them afresh (random resized crop, flip, colour jitter), on the training
split only. AdamW with linear warm-up then cosine decay, stepped per batch. After every epoch a
checkpoint (model, optimizer, scheduler, history, best weights) is written atomically, so a killed
run resumes from its last finished epoch. Each epoch's shuffling and augmentation are seeded from
(seed, epoch), so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from pipeline.core.errors import ConfigError, first_line
from pipeline.core.io import atomic_write
from pipeline.images.decode import decode
from pipeline.images.preprocess import Preprocess
from pipeline.tuning.options import TrainSettings


@dataclass
class Images:
    """Decoded images (N, H, W, 3) uint8 with their labels and the paths they came from."""

    pixels: np.ndarray
    labels: np.ndarray
    paths: list[Path]

    def subset(self, rows: np.ndarray) -> Images:
        return Images(self.pixels[rows], self.labels[rows], [self.paths[i] for i in rows])


def decode_images(paths: list[Path], labels: np.ndarray, pre: Preprocess, desc: str = "decode",
                  progress: bool = True) -> tuple[Images, list[tuple[str, str]]]:
    """Decode every file once; files that fail are returned as (path, reason) and left out."""
    with ThreadPoolExecutor(min(4, os.cpu_count() or 2)) as pool:
        decoded = list(tqdm(pool.map(lambda p: decode(Path(p), pre), paths), total=len(paths), desc=desc,
                            unit="img", disable=None if progress else True))
    good = [i for i, image in enumerate(decoded) if not isinstance(image, str)]
    skipped = [(str(paths[i]), image) for i, image in enumerate(decoded) if isinstance(image, str)]
    pixels = np.stack([decoded[i] for i in good]) if good else np.zeros((0, pre.crop, pre.crop, 3), np.uint8)
    return Images(pixels, np.asarray(labels)[good], [Path(paths[i]) for i in good]), skipped


def square(pre: Preprocess) -> Preprocess:
    """What training images are decoded to: the shorter side resized, the centre square kept, so the
    random resized crop has the margin that evaluation's centre crop leaves out."""
    return Preprocess(pre.resize, pre.resize, pre.mean, pre.std, pre.interpolation)


def augmentation(size: int) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)])


def to_input(batch: torch.Tensor, pre: Preprocess, device: str) -> torch.Tensor:
    """uint8 NCHW -> normalised float, channels-last (the layout the convolutions run fastest in)."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    x = (batch.float() - mean) / std
    return x.to(device, memory_format=torch.channels_last, non_blocking=True)


def _batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches; a last batch of one image joins the one before (BatchNorm needs two)."""
    chunks = np.array_split(rng.permutation(n), max(1, math.ceil(n / size)))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [np.concatenate(chunks[-2:])]
    return chunks


def _schedule(settings: TrainSettings, steps_per_epoch: int) -> Callable[[int], float]:
    warm = settings.warmup * steps_per_epoch
    total = settings.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1.0, total - warm))))
    return factor


def predict_logits(model: nn.Module, images: Images, pre: Preprocess, settings: TrainSettings,
                   batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode(), torch.autocast(settings.device, torch.bfloat16,
                                                 enabled=settings.precision == "bf16"):
        for start in range(0, len(images.labels), batch_size):
            batch = torch.from_numpy(images.pixels[start:start + batch_size]).permute(0, 3, 1, 2)
            out.append(model(to_input(batch, pre, settings.device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # per epoch: loss, val accuracy, seconds
    best_epoch: int = 0  # the epoch kept; 0: the starting weights
    stopped_early: bool = False
    seconds: float = 0.0
    resumed_from: int = 0  # epochs already done when this process started
    start_val_accuracy: float | None = None  # of the starting weights (epoch 0), with a validation split
    best_trained_epoch: int = 0  # the trained epoch best on the held-out part, kept or not
    guard_p: float | None = None  # its one-sided McNemar p-value against the starting weights


def _val_correct(model: nn.Module, val_set: Images, pre: Preprocess, settings: TrainSettings) -> np.ndarray:
    return predict_logits(model, val_set, pre, settings).argmax(1) == val_set.labels


def mcnemar_p(gained: int, lost: int) -> float:
    """One-sided exact McNemar test: the chance of `gained` or more of the `gained + lost` held-out images
    on which two models disagree going the trained model's way, were neither better (a fair coin)."""
    n = gained + lost
    return sum(math.comb(n, k) for k in range(gained, n + 1)) / 2 ** n if n else 1.0


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CHECKPOINT_FORMAT = 3  # 1 (unmarked): loaded with weights_only=False; 2: tensors and plain values only;
# 3: the starting weights and their held-out answers kept beside the best epoch (the guard's test)
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _plain(value: object, where: str = "checkpoint") -> object:
    """`value` as what `torch.load(weights_only=True)` reads back: tensors, str/int/float/bool/None, and
    dicts, lists and tuples of them; a numpy scalar (a score, say) becomes the Python number it equals.
    Anything else (an array, a dataclass, an RNG state) is a bug, refused when the checkpoint is written
    rather than when a run resumes: convert it to tensors or plain values here and back on loading.
    (Nothing needs that today: every epoch reseeds its randomness from (seed, epoch).)"""
    if isinstance(value, np.generic):  # before _PLAIN: np.float64 is a float, and pickles as numpy's
        return value.item()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict) and all(isinstance(k, str | int) for k in value):
        return type(value)((k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a weights-only checkpoint")


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_write(path, "wb") as fh:
        torch.save(_plain({**payload, "format": CHECKPOINT_FORMAT}), fh)


def _load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """The checkpoint's state, read with `weights_only=True`: tensors and plain values are all it can hold,
    so a planted file cannot run code. A checkpoint of the earlier format is refused, not converted."""
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    start_over = "start without --resume (the run begins again at epoch 1)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # an object other than tensors and plain values: not loaded, nothing ran
        raise ConfigError(f"--resume: checkpoint {path} holds objects other than tensors and plain values (an "
                          f"earlier format, or not a checkpoint of this pipeline); it was not loaded: {start_over}"
                          ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(f"--resume: checkpoint {path} cannot be read ({type(exc).__name__}: {first_line(exc)}): "
                          f"{start_over}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume: checkpoint {path} was written by an earlier version of the pipeline (or is "
                          f"not a checkpoint of it): {start_over}")
    if state.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
        raise ConfigError(f"--resume: checkpoint {path} was made with other settings ({', '.join(changed)}); "
                          "rerun with the same options, or without --resume to start over")
    return state


def train(model: nn.Module, groups: list[dict], train_set: Images, val_set: Images | None, pre: Preprocess,
          settings: TrainSettings, checkpoint: Path | None = None, resume: bool = False,
          fingerprint: dict | None = None, on_epoch: Callable[[int, dict], None] | None = None,
          progress: bool = True, restore: bool = True) -> TrainResult:
    """Train `model` (its parameter `groups`, each with its own lr) and leave it at its best epoch (with
    `restore`, else at its last).

    `fingerprint` (settings that must not change between a run and its resumption) is stored with
    the checkpoint; `on_epoch(epoch, record)` is called after each epoch's checkpoint is written."""
    settings.check()
    fingerprint = {**(fingerprint or {}), **asdict(settings), "images": len(train_set.labels)}
    fingerprint.pop("device")
    steps = len(_batches(len(train_set.labels), settings.batch_size, np.random.default_rng(0)))
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    augment = augmentation(pre.crop)
    result = TrainResult()
    best_val, best_state = -1.0, None  # the best trained epoch so far, on the held-out part
    start_state, start_correct = None, None  # the starting weights and which held-out images they get right
    validate = val_set is not None and len(val_set.labels) > 0
    if resume and checkpoint is not None:
        state = _load_checkpoint(checkpoint, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(state["history"], 0, state["stopped_early"], state["seconds"],
                             len(state["history"]), state["start_val_accuracy"], state["best_trained_epoch"])
        best_val, best_state, start_state = state["best_val"], state["best_state"], state["start_state"]
        start_correct = None if state["start_correct"] is None else np.array(state["start_correct"], dtype=bool)
    elif validate:
        # Epoch 0, the starting weights (with LP-FT: the linear probe), competes with the trained epochs,
        # so a run that only overfits its few images ends where it started instead of below it.
        start_correct = _val_correct(model, val_set, pre, settings)
        result.start_val_accuracy = float(start_correct.mean())
        start_state = _copy_state(model)
    started = time.perf_counter() - result.seconds
    epoch = len(result.history)
    while epoch < settings.epochs and not result.stopped_early:
        epoch += 1
        record = _epoch(model, optimizer, scheduler, loss_fn, augment, train_set, pre, settings, epoch, progress)
        if validate:
            correct = _val_correct(model, val_set, pre, settings)
            record["val_accuracy"] = float(correct.mean())
            # held-out images this epoch gets right and the starting weights not, and the other way round
            record["val_gained"] = int((correct & ~start_correct).sum())
            record["val_lost"] = int((start_correct & ~correct).sum())
        score = record.get("val_accuracy", float(epoch))  # no validation split: the last epoch is the best
        if score > best_val:
            best_val, result.best_trained_epoch = score, epoch
            best_state = _copy_state(model)
        leader = result.best_trained_epoch if best_val > (result.start_val_accuracy or -1.0) else 0
        result.stopped_early = validate and epoch - leader >= settings.patience
        result.history.append(record)
        result.seconds = time.perf_counter() - started
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": result.history, "best_trained_epoch": result.best_trained_epoch, "best_val": best_val,
                "best_state": best_state, "stopped_early": result.stopped_early, "seconds": result.seconds,
                "start_val_accuracy": result.start_val_accuracy, "start_state": start_state,
                "start_correct": None if start_correct is None else start_correct.tolist(), "fingerprint": fingerprint})
        if on_epoch:
            on_epoch(epoch, record)
    result.best_epoch = _guard(result, settings) if validate else result.best_trained_epoch
    kept_state = best_state if result.best_epoch else start_state
    if restore and kept_state is not None:
        model.load_state_dict(kept_state)
    result.seconds = time.perf_counter() - started
    return result


def _guard(result: TrainResult, settings: TrainSettings) -> int:
    """The epoch kept: the trained epoch best on the held-out part when it beats the starting weights there
    by more than chance (one-sided exact McNemar test at `settings.guard_alpha`), else 0, the starting
    weights. The best of several epochs on one small held-out part is an estimate biased upwards: a small
    lead over the starting weights there does not carry over to new images (benchmarks/RESULTS.md)."""
    if not result.best_trained_epoch:
        return 0
    best = result.history[result.best_trained_epoch - 1]
    if best["val_accuracy"] <= result.start_val_accuracy:
        return 0
    result.guard_p = mcnemar_p(best["val_gained"], best["val_lost"])
    return result.best_trained_epoch if result.guard_p <= settings.guard_alpha else 0


def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
           loss_fn: nn.Module, augment: v2.Compose, train_set: Images, pre: Preprocess, settings: TrainSettings,
           epoch: int, progress: bool) -> dict:
    """One pass over the training images; randomness seeded from (seed, epoch) for exact resumption."""
    torch.manual_seed(settings.seed * 100_003 + epoch)
    rng = np.random.default_rng([settings.seed, epoch])
    model.train()
    started, total, seen = time.perf_counter(), 0.0, 0
    pixels = torch.from_numpy(train_set.pixels).permute(0, 3, 1, 2)
    labels = torch.from_numpy(train_set.labels).long()
    batches = _batches(len(labels), settings.batch_size, rng)
    for rows in tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", unit="batch", leave=False,
                     disable=None if progress else True):
        x = to_input(torch.stack([augment(pixels[i]) for i in rows]), pre, settings.device)
        y = labels[rows].to(settings.device)
        with torch.autocast(settings.device, torch.bfloat16, enabled=settings.precision == "bf16"):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(rows)
        seen += len(rows)
    return {"epoch": epoch, "loss": total / max(seen, 1), "seconds": time.perf_counter() - started,
            "lr": scheduler.get_last_lr()[0]}
