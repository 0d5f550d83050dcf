"""Stage-1 commands: `pipeline extract`, `pipeline cache ls|verify|gc` and `pipeline backbones`."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from pipeline.core.errors import OutputError
from pipeline.core.names import DEFAULT_BACKBONE

SKIPPED_HELP = "write the CSV of skipped files here (default: none; the first ten are printed)"


def add_extract_options(parser: argparse.ArgumentParser,
                        skipped_help: str = "where to write the CSV of skipped files (default: CACHE/skipped.csv)"
                        ) -> None:
    """Each option overrides the config's value (its default is the config's, then the settings')."""
    from pipeline.cli.options import add_setting
    from pipeline.features.settings import DEVICES, PRECISIONS, RUNTIMES, ExtractSettings

    add = parser.add_argument
    add("--data", metavar="PATH",
        help="image folder (DIR/<class>/<image>), flat folder, or a text file listing one image path per line")
    add("--config", metavar="FILE", help="YAML config with data: and features: sections (see configs/)")
    add("--backbone", metavar="NAME", action="append",
        help=f"registered backbone, repeatable (default: {DEFAULT_BACKBONE}; list: pipeline backbones)")
    add("--layer", metavar="LAYER", action="append",
        help="tap point, NAME or BACKBONE:NAME, repeatable (default: each backbone's last feature block)")
    setting = functools.partial(add_setting, parser, ExtractSettings, override=True)
    setting("cache_dir", "--cache", metavar="DIR")
    setting("device", choices=DEVICES)
    setting("precision", choices=PRECISIONS)
    setting("runtime", choices=RUNTIMES)
    setting("batch_size", metavar="N", type=int)
    setting("shard_size", metavar="N", type=int)
    setting("scheduler", metavar="ADDRESS")
    setting("weights", metavar="PATH")
    add("--skipped", metavar="FILE", help=skipped_help)
    add("--quiet", action="store_true", help="no progress bar")
    add_offline_option(parser)


def add_offline_option(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    parser.add_argument("--offline", action="store_true", default=default,
                        help="never download weights (as PIPELINE_OFFLINE=1 or HF_HUB_OFFLINE=1): use what is on "
                             "disk, else fail naming the file and where to put it")


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.app.config import extract_settings
    from pipeline.app.skiplist import write_skip_list
    from pipeline.cli.skips import print_skips
    from pipeline.features.extract import extract

    sources, settings = extract_settings(args.config, args.data, overrides(args))
    skipped: list[tuple[str, str]] = []
    for split, folder in sources.items():
        if len(sources) > 1:
            print(f"== {split}: {folder}")
        report = extract(folder, progress=not args.quiet, rehash=args.rehash, **settings)
        for (backbone, layer), fs in report.feature_sets.items():
            print(f"{backbone} [{layer}]: {fs.features.shape[0]} x {fs.features.shape[1]} features "
                  f"in {Path(settings['cache_dir']) / fs.cache_key}")
        print(report.summary())
        skipped += report.skipped
    skipped_csv = Path(args.skipped) if args.skipped else Path(settings["cache_dir"]) / "skipped.csv"
    try:
        write_skip_list(skipped_csv, skipped)
    except OutputError as exc:  # the features are committed; a read-only cache is fine when nothing is lost
        if args.skipped:
            raise
        if skipped:
            print_skips(skipped)
            raise OutputError(f"{exc} ({len(skipped)} files were skipped; --skipped FILE writes their list "
                              "elsewhere)") from exc
        print(f"warning: {exc} (nothing was skipped)", file=sys.stderr)
        return 0
    print_skips(skipped, full_list=skipped_csv)
    return 0


def _human_bytes(size: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def cmd_cache(args: argparse.Namespace) -> int:
    from pipeline.features.cache import FeatureStore, clean_staging

    stores = FeatureStore.all_in(args.cache)
    if args.action == "ls":
        if not stores:
            print(f"no feature caches in {args.cache}")
        rows = [s.summary() for s in stores]
        width = max([len(r["key"]) for r in rows] + [3])
        if rows:
            print(f"{'key':<{width}}  {'backbone':<20} {'layer':<8} {'dim':>5} {'rows':>7} {'shards':>6} size")
        for r in rows:
            print(f"{r['key']:<{width}}  {r['backbone']:<20} {r['layer']:<8} {r['dim']:>5} {r['rows']:>7} "
                  f"{r['shards']:>6} {_human_bytes(r['bytes'])}")
        return 0
    if args.action == "verify":
        problems = [p for s in stores for p in s.verify()]
        orphans = sum(len(s.orphans()) for s in stores)
        for problem in problems:
            print(problem)
        shards = sum(len(s.records()) for s in stores)
        print(f"checked {shards} shards in {len(stores)} caches: "
              f"{'OK' if not problems else f'{len(problems)} problems (pipeline cache gc drops them)'}"
              + (f"; {orphans} unreferenced arrays (harmless, gc removes them after an hour)" if orphans else ""))
        return 1 if problems else 0
    removed = [r for s in stores for r in s.gc()] + clean_staging(args.cache)
    for line in removed:
        print(f"removed {line}")
    print(f"gc: removed {len(removed)} items")
    return 0


def _layer_summary(spec: Any) -> str:
    """Layers as `name:dim`, a transformer's pooled variants folded: `block1..12_{cls,mean,cls_mean}:384`."""
    import re

    groups: dict[tuple[str, str, int], list[int]] = {}
    plain = []
    for name, layer in spec.layers.items():
        match = re.fullmatch(r"block(\d+)_(\w+)", name)
        if match and layer.pool:
            groups.setdefault(("block", layer.pool, layer.dim), []).append(int(match.group(1)))
        else:
            plain.append(f"{name}:{layer.dim}" + ("*" if name == spec.default_layer else ""))
    folded = [f"block{min(ix)}..{max(ix)}_{pool}:{dim}" for (_b, pool, dim), ix in groups.items()]
    return ", ".join(plain[:1] + folded + plain[1:])


def cmd_backbones(args: argparse.Namespace) -> int:
    from pipeline.models.download import offline
    from pipeline.models.registry import families, get_spec, list_backbones
    from pipeline.models.weights import weights_on_disk

    for name in args.names or list_backbones():
        spec = get_spec(name)
        path = weights_on_disk(spec)
        if path is not None:
            weights = f"on disk: {path}"
        elif spec.remote is not None:
            size = _human_bytes(spec.remote.size) if spec.remote.size else "size unknown"
            weights = (f"not on disk; {'--offline: not downloadable now' if offline() else 'downloaded on first use'}"
                       f" ({size}) from {spec.remote.url}")
        else:
            weights = "not on disk (pass --weights PATH; see docs/guide/backbones.md)"
        pre = spec.preprocess
        print(f"{name}\n  {spec.source}\n  weights: {weights}")
        if spec.card is not None:
            figure = f"; {spec.card.published} ({spec.card.citation})" if spec.card.published else ""
            print(f"  licence: {spec.card.licence}; {spec.card.params_m:g} M parameters{figure}")
        print(f"  input: resize {pre.resize}, crop {pre.crop}, {pre.interpolation}\n"
              f"  layers (name:dim, * = default): {_layer_summary(spec)}")
    if not args.names:
        for prefix in families():
            print(f"{prefix}NAME\n  any timm model with weights on the Hugging Face hub, e.g. {prefix}resnet50.a1_in1k "
                  "(its hub file, checked against the hub's SHA-256)")
    return 0


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The extract options given on the command line (None: not given, the config's value stands)."""
    return {"backbones": args.backbone, "layers": args.layer, "cache_dir": args.cache, "device": args.device,
            "precision": args.precision, "runtime": args.runtime, "batch_size": args.batch_size,
            "shard_size": args.shard_size, "scheduler": args.scheduler, "weights": args.weights}


def add_feature_parsers(sub: argparse._SubParsersAction) -> None:
    """`extract`, `cache` and `backbones`."""
    from pipeline.cli.options import add_setting
    from pipeline.features.settings import ExtractSettings

    extract = sub.add_parser("extract", help="embed images with frozen backbones into the feature cache",
                             description="Embed images with frozen pretrained backbones into the sharded "
                                         "feature cache; only images missing from the cache are computed. A file "
                                         "whose size, mtime, inode and device are as the cache's stat memo last "
                                         "saw them is not read again to identify it.")
    add_extract_options(extract)
    extract.add_argument("--rehash", action="store_true",
                         help="read and hash every input file, even those the cache's stat memo has seen unchanged "
                              "(size, mtime, inode, device), and remember the ids again")
    extract.set_defaults(func=cmd_extract)

    cache = sub.add_parser("cache", help="list, verify or clean the feature cache",
                           description="ls: keys, rows and size; verify: re-check every shard against its "
                                       "completion record; gc: drop damaged shards and leftovers.")
    cache.add_argument("action", choices=["ls", "verify", "gc"])
    add_setting(cache, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
    cache.set_defaults(func=cmd_cache)

    backbones = sub.add_parser(
        "backbones", help="list registered backbones: weights on disk or to download, licence, layers",
        description="List the registered backbones (or the NAMEs given): where their weights are on disk, or "
                    "what would be downloaded and how large; licence, parameters, the published ImageNet "
                    "figure with its source, input preprocessing and layers. Nothing is downloaded.")
    backbones.add_argument("names", nargs="*", metavar="NAME", help="only these (also timm.MODEL names)")
    backbones.set_defaults(func=cmd_backbones)
