"""The ``seer`` command: argument parsing, one function call per subcommand, one-line errors.

    seer ingest SRC... --out DIR [--json] [--watch]
    seer pretrain CONFIG [key=value ...]
    seer export RUN_DIR_OR_CHECKPOINT --out FILE [--num-classes N]
    seer inspect PATH [--json]
    seer plan CONFIG [world_size=N] [key=value ...] [--json]
    seer demo-corpus OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _cmd_ingest(args: argparse.Namespace) -> int:
    from data_pipeline.ingest import ingest, watch

    options = dict(
        shard_max_count=args.shard_count,
        shard_max_bytes=args.shard_mb * 2**20,
        max_pixels=args.max_pixels,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.watch:
        if len(args.sources) != 1:
            raise ValueError("--watch takes exactly one drop folder")
        print(f"watching {args.sources[0]} -> {args.out} (Ctrl-C to stop)", file=sys.stderr)
        try:
            watch(args.sources[0], args.out, poll_seconds=args.poll, retention_days=args.retention_days, **options)
        except KeyboardInterrupt:
            pass
        return 0
    report = ingest(args.sources, args.out, **options)
    summary = report.to_dict()
    if args.json:
        print(json.dumps(summary))
    else:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(report.rejected.items())) or "none"
        print(
            f"accepted {report.accepted}, duplicates {report.duplicates}, rejected: {rejected}; "
            f"{len(report.shards)} new shard(s) in {args.out}"
        )
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from seer.config import load_config

    cfg = load_config(args.config, args.overrides)
    from seer.engine.train import pretrain

    summary = pretrain(cfg)
    if args.json:
        print(json.dumps(summary))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from seer.export import export_backbone

    result = export_backbone(args.source, args.out, num_classes=args.num_classes)
    print(json.dumps(result) if args.json else f"wrote {result['out']} ({result['architecture']}, step {result['step']}) and {result['sidecar']}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from seer.inspection import inspect_path

    info = inspect_path(args.path)
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from seer.config import load_config
    from seer.plan import compute_plan, format_plan

    world = [o for o in args.overrides if o.startswith("world_size=")]
    overrides = [o for o in args.overrides if not o.startswith("world_size=")]
    world_size = int(world[-1].split("=", 1)[1]) if world else 1
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    plan = compute_plan(load_config(args.config, overrides), world_size)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from data_pipeline.sample_corpus import build_sample_corpus

    files = build_sample_corpus(args.out, crops_per_photo=args.crops_per_photo, seed=args.seed)
    print(f"wrote {len(files)} images to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seer", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "ingest",
        help="pack image files into WebDataset shards",
        formatter_class=_Formatter,
        description="Validate images (decodable, sane size, pixel limit) and pack them into WebDataset tar "
        "shards plus manifest.json, published atomically. SRC may be files, folders (recursive) or @list.txt "
        "files of paths. Re-running adds nothing twice (content hash).",
    )
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("--out", required=True, help="shard folder")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    p.add_argument("--shard-count", type=int, default=1000, help="images per shard at most")
    p.add_argument("--shard-mb", type=int, default=256, help="MiB per shard at most")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="decompression-bomb limit")
    p.add_argument("--watch", action="store_true", help="watch SRC as a drop folder until stopped")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks at the drop folder")
    p.add_argument(
        "--retention-days", type=float, default=None,
        help="with --watch: retire and delete shards older than this many days, once per poll",
    )
    p.set_defaults(fn=_cmd_ingest)

    p = sub.add_parser(
        "pretrain",
        help="train a backbone (resumes from run.dir's newest checkpoint)",
        formatter_class=_Formatter,
        description="Train with a YAML preset and key=value overrides, e.g. "
        "`seer pretrain configs/quickstart.yaml train.max_steps=200 run.dir=runs/a`. Launch several ranks with "
        "torchrun or cluster/. Restarting with the same run.dir continues from the newest checkpoint.",
    )
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser(
        "export",
        help="write a checkpoint's backbone as safetensors for torchvision/timm",
        formatter_class=_Formatter,
        description="Consolidate the newest checkpoint of a run (or a given step_* folder) and write the "
        "backbone with torchvision's (RegNet) or timm's (ViT) keys, plus a JSON sidecar.",
    )
    p.add_argument("source", help="run folder, its checkpoints/ folder, or a step_* folder")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--num-classes", type=int, default=1000, help="add a fresh classifier of this size (0: none)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("inspect", help="summarise a shard folder or a checkpoint", formatter_class=_Formatter)
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser(
        "plan",
        help="per-rank memory and FLOPs of a config, with the arithmetic",
        formatter_class=_Formatter,
        description="Print, per rank, the bytes of parameters, gradients, optimizer state and activations "
        "(with and without activation checkpointing) and the FLOPs per step, e.g. "
        "`seer plan configs/seer_regnety256gf_swav.yaml world_size=512`. Models are built on the meta device.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="world_size=N|key=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser(
        "demo-corpus",
        help="write the sample photographs that ship in scikit-image/scikit-learn",
        formatter_class=_Formatter,
    )
    p.add_argument("out")
    p.add_argument("--crops-per-photo", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from seer.config import ConfigError

    expected: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)
    try:
        from data_pipeline.ingest import IngestError

        expected += (IngestError,)
    except ImportError:
        pass
    try:
        return args.fn(args)
    except expected as err:
        print(f"seer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seer {args.command}: interrupted", file=sys.stderr)
        return 130
