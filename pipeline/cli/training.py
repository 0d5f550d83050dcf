"""The stage-3 commands, `pipeline finetune` and `pipeline compare`: their options and what they print."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.names import DEFAULT_BACKBONE


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.app.stage3 import run_finetune
    from pipeline.tuning.finetune import FinetuneOptions
    from pipeline.tuning.training import TrainSettings

    settings = TrainSettings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                             label_smoothing=args.label_smoothing, batch_size=args.batch_size, patience=args.patience,
                             seed=args.seed, device=args.device, precision=args.precision)
    options = FinetuneOptions(args.data, args.test, args.backbone, args.unfreeze, args.lr_decay, args.init,
                              args.train_bn, args.val_fraction, args.probe_c, args.out, args.name, args.backbones_dir,
                              args.cache, args.resume, settings)

    def report(epoch: int, record: dict) -> None:
        val = f", validation accuracy {record['val_accuracy']:.1%}" if "val_accuracy" in record else ""
        print(f"epoch {epoch}/{settings.epochs}: loss {record['loss']:.4f}{val} ({record['seconds']:.1f} s)")

    result = run_finetune(options, progress=not args.quiet, on_epoch=report)
    m = result.metrics
    if m["best_epoch"] == 0:
        print(f"no epoch beat the starting weights on the validation split ({m['start_val_accuracy']:.1%}): "
              "the saved backbone keeps them (with LP-FT: the parent network and the probe as its head)")
    if m.get("probe_accuracy") is not None:
        print(f"linear probe alone (the LP-FT starting point): test accuracy {m['probe_accuracy']:.1%}")
    if "accuracy" in m:
        print(f"fine-tuned (best epoch {m['best_epoch']}): test accuracy {m['accuracy']:.1%}, "
              f"macro-F1 {m['macro_f1']:.3f}")
    print(f"saved backbone {result.backbone!r} in {result.folder} ({m['seconds']:.0f} s); "
          f"metrics: {Path(args.out) / 'finetune.json'}; figure: {Path(args.out) / 'finetune.png'}")
    print(f"use it like any backbone: pipeline extract --backbone {result.backbone} --data DIR")
    return 0


def _add_training_compute_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.features.extract import DEVICES, PRECISIONS

    add = parser.add_argument
    add("--cache", default="cache", metavar="DIR", help="feature cache for the probe (default: %(default)s)")
    add("--device", choices=DEVICES, default="auto", help="auto picks CUDA when present (default: auto)")
    add("--precision", choices=PRECISIONS, default="auto",
        help="bf16 autocast (auto: on CUDA and on CPUs with AMX/AVX512-BF16) or fp32")
    add("--quiet", action="store_true", help="no progress bars")


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.tuning.finetune import EPOCHS, INITS, LR, FinetuneOptions

    parser = sub.add_parser(
        "finetune", help="fine-tune a backbone on a labelled folder and register it as a new backbone",
        description="Stage 3: unfreeze the last blocks of a backbone (or all, or none) and train it with a new "
                    "linear layer, started from the stage-2 linear probe on cached features (LP-FT). AdamW with "
                    "warm-up and cosine decay, discriminative learning rates, train-only augmentation, BatchNorm "
                    "frozen, optional early stopping on a validation split, a checkpoint each epoch (--resume). "
                    "The result is saved as a new backbone that extract, rank and the heads use by its name.")
    add = parser.add_argument
    add("--data", required=True, metavar="DIR", help="labelled training folder (DIR/<class>/<image>)")
    add("--test", metavar="DIR", help="labelled test folder: reports test accuracy of the probe and the fine-tuned net")
    add("--backbone", default=DEFAULT_BACKBONE, metavar="NAME",
        help="backbone to start from (default: %(default)s)")
    add("--unfreeze", default=FinetuneOptions.unfreeze, metavar="head|last:N|all",
        help="what trains besides the new linear layer: nothing, the N blocks nearest the head, or every block "
             "(default: %(default)s; efficientnet_lite0 has 18 blocks)")
    add("--lr", type=float, default=LR, help="learning rate of the new layer (default: %(default)s)")
    add("--lr-decay", type=float, default=FinetuneOptions.lr_decay,
        help="each earlier block learns at this factor times the next block's rate (default: %(default)s)")
    add("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    add("--epochs", type=int, default=EPOCHS,
        help="epochs to train: exactly these without a validation split, at most these with one "
             "(default: %(default)s)")
    add("--warmup", type=float, default=1.0, help="epochs of linear warm-up before cosine decay (default: %(default)s)")
    add("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss (default: %(default)s)")
    add("--init", choices=INITS, default="probe",
        help="probe: start the new layer from the logistic-regression probe on cached features (LP-FT); "
             "random: PyTorch's default initialisation (default: %(default)s)")
    add("--probe-c", type=float, metavar="C", help="the probe's C (default: chosen by 5-fold CV)")
    add("--train-bn", action="store_true", help="let BatchNorm layers of unfrozen blocks learn and update statistics")
    add("--val-fraction", type=float, default=FinetuneOptions.val_fraction,
        help="stratified share of the training folder held out to pick the best epoch and stop early; 0 for "
             "none: train every epoch, keep the last (default: %(default)s)")
    add("--patience", type=int, default=3,
        help="with --val-fraction > 0: epochs without a better validation accuracy before stopping "
             "(default: %(default)s)")
    add("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the split, shuffling and augmentation (default: %(default)s)")
    add("--out", default="runs/finetune", metavar="DIR",
        help="checkpoint.pt, finetune.json and finetune.png go here (default: %(default)s)")
    add("--name", metavar="NEW_ID", help="id of the saved backbone (default: BACKBONE_ft_<name of --out>)")
    add("--backbones-dir", metavar="DIR",
        help="where the backbone is saved (default: the first folder of $PIPELINE_BACKBONES, else backbones/)")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same options needed)")
    _add_training_compute_options(parser)
    parser.set_defaults(func=cmd_finetune)


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.app.stage3 import run_compare
    from pipeline.tuning.compare import CompareOptions, parse_shots

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be integers, comma-separated, not {args.seeds!r}") from None
    options = CompareOptions(args.data, args.test, parse_shots(args.shots), seeds, args.backbone, args.unfreeze,
                             args.finetune_steps, args.scratch_steps, args.scratch_size, cache_dir=args.cache,
                             out=args.out, device=args.device, precision=args.precision)
    run_compare(options, progress=not args.quiet)
    print(f"results: {Path(args.out) / 'compare.json'}; figure: {Path(args.out) / 'compare.png'}; "
          f"report: {Path(args.out) / 'compare.html'}")
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare", help="transfer vs. training from scratch at k labelled images per class",
        description="On the same k-shot draws of the training folder, train the linear probe on frozen cached "
                    "features, LP-FT fine-tuning (a short fixed schedule) and a small CNN from scratch; score each "
                    "on the test folder and time it. Writes compare.json, compare.png and compare.html.")
    add = parser.add_argument
    add("--data", required=True, metavar="DIR", help="labelled training folder")
    add("--test", required=True, metavar="DIR", help="labelled test folder")
    add("--shots", default="1,5,10,all", help="labelled images per class, comma-separated (default: %(default)s)")
    add("--seeds", default="0,1,2", help="seeds of the k-shot draws (default: %(default)s)")
    add("--backbone", default=DEFAULT_BACKBONE, metavar="NAME", help="backbone for the probe and fine-tuning")
    add("--unfreeze", default="last:3", metavar="head|last:N|all", help="fine-tuning's blocks (default: %(default)s)")
    add("--finetune-steps", type=int, default=60, metavar="N", help="optimizer steps of each fine-tuning run")
    add("--scratch-steps", type=int, default=300, metavar="N", help="optimizer steps of each from-scratch run")
    add("--scratch-size", type=int, default=96, metavar="PX", help="input size of the from-scratch CNN")
    add("--out", default="runs/compare", metavar="DIR", help="output folder (default: %(default)s)")
    _add_training_compute_options(parser)
    parser.set_defaults(func=cmd_compare)
