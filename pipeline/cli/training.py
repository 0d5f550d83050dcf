"""The stage-3 commands, `pipeline finetune` and `pipeline compare`: their options and what they print."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from pipeline.core.errors import ConfigError


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.app.stage3 import run_finetune
    from pipeline.cli.skips import report_skips
    from pipeline.tuning.options import FinetuneOptions, TrainSettings

    settings = TrainSettings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                             label_smoothing=args.label_smoothing, batch_size=args.batch_size, patience=args.patience,
                             seed=args.seed, device=args.device, precision=args.precision, guard_alpha=args.guard_alpha)
    options = FinetuneOptions(args.data, args.test, args.backbone, args.unfreeze, args.lr_decay, args.init,
                              args.train_bn, args.val_fraction, args.probe_c, args.out, args.name, args.backbones_dir,
                              args.cache, args.resume, settings, ensemble=args.ensemble)

    def report(epoch: int, record: dict) -> None:
        val = f", held-out accuracy {record['val_accuracy']:.1%}" if "val_accuracy" in record else ""
        print(f"epoch {epoch}/{settings.epochs}: loss {record['loss']:.4f}{val} ({record['seconds']:.1f} s)")

    result = run_finetune(options, progress=not args.quiet, on_epoch=report)
    report_skips(result.skipped, args.skipped)
    m = result.metrics
    if m["guard"] is not None and m["kept"] != "probe":  # keeping the probe is logged where it is decided
        tail = ": the saved backbone keeps the starting weights" if m["kept"] == "initial" else ""
        print(f"{m['guard']}{tail} ({m['images']['val']} held-out images)")
    if m.get("probe_accuracy") is not None:
        start = m.get("start_probe_accuracy")
        started = "" if start is None or m["images"]["val"] == 0 else (
            f" (the probe LP-FT started from, fitted on the {m['images']['train']} images it trained on: {start:.1%})")
        print(f"linear probe alone (logistic regression on every training image): test accuracy "
              f"{m['probe_accuracy']:.1%}{started}")
    if "accuracy" in m:
        what = {"probe": "kept the probe", "ensemble": f"the ensemble of epoch {m['best_epoch']} with the probe"
                }.get(m["kept"], f"fine-tuned (best epoch {m['best_epoch']})")
        print(f"{what}: test accuracy {m['accuracy']:.1%}, "
              f"macro-F1 {m['macro_f1']:.3f}")
    print(f"saved backbone {result.backbone!r} in {result.folder} ({m['seconds']:.0f} s); "
          f"metrics: {Path(args.out) / 'finetune.json'}; figure: {Path(args.out) / 'finetune.png'}")
    print(f"use it like any backbone: pipeline extract --backbone {result.backbone} --data DIR")
    return 0


def _add_training_compute_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli.features import SKIPPED_HELP
    from pipeline.cli.options import add_setting
    from pipeline.features.settings import DEVICES, PRECISIONS, ExtractSettings

    add_setting(parser, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
    add_setting(parser, ExtractSettings, "device", choices=DEVICES)
    add_setting(parser, ExtractSettings, "precision", choices=PRECISIONS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--skipped", metavar="FILE", help=SKIPPED_HELP)


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.app.config import FinetuneSection
    from pipeline.cli.options import add_setting
    from pipeline.core.schema import dataclass_default
    from pipeline.tuning.options import INITS, FinetuneOptions

    parser = sub.add_parser(
        "finetune", help="fine-tune a backbone on a labelled folder and register it as a new backbone",
        description="Stage 3: unfreeze the last blocks of a backbone (or all, or none) and train it with a new "
                    "linear layer, started from the stage-2 linear probe on cached features (LP-FT). AdamW with "
                    "warm-up and cosine decay, discriminative learning rates, train-only augmentation, BatchNorm "
                    "frozen, a checkpoint each epoch (--resume). What is kept is the last epoch's network averaged "
                    "with the probe (--ensemble, the default: one twin backbone, the parent's blocks shared). Never "
                    "below its own probe: a stratified part of the training folder (--val-fraction) is held out, "
                    "and when the ensemble is below the probe there (with --no-ensemble: unless the best epoch beats "
                    "the probe there, --guard-alpha) the probe is kept (refitted on every training image) and the "
                    "run says so. The result is saved as a new backbone that extract, rank and the heads use by its "
                    "name.")
    add = parser.add_argument
    add("--data", required=True, metavar="DIR", help="labelled training folder (DIR/<class>/<image>)")
    add("--test", metavar="DIR", help="labelled test folder: reports test accuracy of the probe and the fine-tuned net")
    add("--backbone", default=dataclass_default(FinetuneOptions, "backbone"), metavar="NAME",
        help="backbone to start from (default: %(default)s)")
    setting = functools.partial(add_setting, parser, FinetuneSection)
    setting("unfreeze", metavar="head|last:N|all")
    setting("lr", type=float)
    setting("lr_decay", type=float)
    setting("weight_decay", type=float)
    setting("epochs", type=int)
    setting("warmup", type=float)
    setting("label_smoothing", type=float)
    setting("init", choices=INITS)
    setting("probe_C", "--probe-c", type=float, metavar="C")
    setting("train_bn", action="store_true")
    setting("val_fraction", type=float)
    setting("guard_alpha", type=float, metavar="P")
    setting("ensemble", action=argparse.BooleanOptionalAction)
    setting("patience", type=int)
    setting("batch_size", type=int)
    setting("seed", type=int)
    add("--out", default=dataclass_default(FinetuneOptions, "out"), metavar="DIR",
        help="checkpoint.pt, finetune.json and finetune.png go here (default: %(default)s)")
    add("--name", metavar="NEW_ID", help="id of the saved backbone (default: BACKBONE_ft_<name of --out>)")
    setting("backbones_dir", metavar="DIR")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same options needed)")
    _add_training_compute_options(parser)
    parser.set_defaults(func=cmd_finetune)


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.app.stage3 import run_compare
    from pipeline.cli.skips import report_skips
    from pipeline.tuning.compare import parse_shots
    from pipeline.tuning.options import CompareOptions

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be integers, comma-separated, not {args.seeds!r}") from None
    options = CompareOptions(args.data, args.test, parse_shots(args.shots), seeds, args.backbone, args.unfreeze,
                             args.finetune_steps, args.scratch_steps, args.scratch_size, cache_dir=args.cache,
                             out=args.out, device=args.device, precision=args.precision)
    result = run_compare(options, progress=not args.quiet)
    report_skips([(path, reason) for path, reason in result["skipped"]], args.skipped)
    print(f"results: {Path(args.out) / 'compare.json'}; figure: {Path(args.out) / 'compare.png'}; "
          f"report: {Path(args.out) / 'compare.html'}")
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.app.config import CompareSection
    from pipeline.cli.options import add_setting, default, joined
    from pipeline.core.schema import dataclass_default
    from pipeline.tuning.options import CompareOptions

    parser = sub.add_parser(
        "compare", help="transfer vs. training from scratch at k labelled images per class",
        description="On the same k-shot draws of the training folder, train the linear probe on frozen cached "
                    "features, LP-FT fine-tuning (a short fixed schedule) and a small CNN from scratch; score each "
                    "on the test folder and time it. Writes compare.json, compare.png and compare.html.")
    add = parser.add_argument
    add("--data", required=True, metavar="DIR", help="labelled training folder")
    add("--test", required=True, metavar="DIR", help="labelled test folder")
    add("--shots", default=joined(default(CompareSection, "shots")),
        help="labelled images per class, comma-separated (default: %(default)s)")
    add("--seeds", default=joined(default(CompareSection, "seeds")),
        help="seeds of the k-shot draws (default: %(default)s)")
    add("--backbone", default=dataclass_default(CompareOptions, "backbone"), metavar="NAME",
        help="backbone for the probe and fine-tuning (default: %(default)s)")
    setting = functools.partial(add_setting, parser, CompareSection)
    setting("unfreeze", metavar="head|last:N|all")
    setting("finetune_steps", type=int, metavar="N")
    setting("scratch_steps", type=int, metavar="N")
    setting("scratch_size", type=int, metavar="PX")
    add("--out", default=dataclass_default(CompareOptions, "out"), metavar="DIR",
        help="output folder (default: %(default)s)")
    _add_training_compute_options(parser)
    parser.set_defaults(func=cmd_compare)
