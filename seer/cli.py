"""The ``seer`` command: argument parsing, one function call per subcommand, one-line errors.

    seer ingest SRC... --out DIR [--json] [--watch]
    seer pretrain CONFIG [key=value ...]
    seer export RUN_DIR_OR_CHECKPOINT --out FILE [--format seer|torchvision|timm] [--num-classes N] [--encoder base|momentum]
    seer eval knn|linear|lowshot BACKBONE --data DIR [--test DIR] [--json]
    seer plot RUN_DIR [--out FILE]
    seer inspect PATH [--json] | seer inspect --env [--json]
    seer plan CONFIG [world_size=N] [key=value ...] [--json]
    seer demo-corpus OUT_DIR
    seer launch CONFIG [key=value ...] --nodes N --gpus-per-node G --partition P --time MIN [--local] [--dry-run] [--json]
    seer status JOB_DIR_OR_RUN_DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    report = ingest(args.sources, args.out, shuffle_seed=None if args.keep_order else args.shuffle_seed, **options)
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

    result = export_backbone(args.source, args.out, num_classes=args.num_classes, fmt=args.format,
                             encoder=args.encoder, seed=args.seed)
    print(json.dumps(result) if args.json else f"wrote {result['out']} ({result['architecture']}, {result['format']} "
          f"layout, step {result['step']}) and {result['sidecar']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from seer.eval.runner import default_output, evaluate, format_table, log_to_tensorboard, save_report

    report = evaluate(
        args.protocol, args.backbone, args.data, test=args.test, train_limit=args.train_limit,
        test_limit=args.test_limit, size=args.size, cache_dir=None if args.no_cache else Path(args.cache_dir),
        encoder=args.encoder, seed=args.seed, ks=tuple(args.k), shots=tuple(args.shots),
    )
    out = save_report(report, Path(args.out) if args.out else default_output(report, args.backbone))
    log_to_tensorboard(report)
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    print(json.dumps({**clean, "json": str(out)}) if args.json else f"{format_table(report)}\n\nwrote {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from seer.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from seer.inspection import inspect_env, inspect_path

    if (args.path is None) == (not args.env):
        raise ValueError("give a shard folder or checkpoint to inspect, or --env, not both" if args.env
                         else "give a shard folder or checkpoint to inspect, or --env")
    info = inspect_env() if args.env else inspect_path(args.path)
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


def _cmd_launch(args: argparse.Namespace) -> int:
    from cluster.slurm import Layout, describe, launch

    layout = Layout(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem, partition=args.partition, time_min=args.time,
        account=args.account, qos=args.qos, constraint=args.constraint, signal_delay_s=args.signal_delay,
        max_requeues=args.max_requeues, max_restarts=args.max_restarts,
    )
    info = launch(args.config, args.overrides, layout, local=args.local, dry_run=args.dry_run, folder=args.folder)
    job = info.pop("job", None)
    print(json.dumps(info) if args.json else describe(info), flush=True)
    if job is not None and args.local:  # the local executor's job lives as long as this process
        from submitit.core.utils import UncompletedJobError

        try:
            summary = job.results()[0]  # rank 0's
        except KeyboardInterrupt:
            job.cancel()
            raise
        except UncompletedJobError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise ValueError(f"the job failed ({lines[-1] if lines else 'no message'}); logs in {info['folder']}") from None
        print(json.dumps(summary) if args.json else f"finished at step {summary['step']} ({summary['run_dir']})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster.status import format_status, job_status

    status = job_status(args.path)
    print(json.dumps(status) if args.json else format_status(status))
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
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the random order files are packed in")
    p.add_argument("--keep-order", action="store_true", help="pack files in path order instead (not shuffled)")
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
    p.add_argument("--num-classes", type=int, default=1000, help="add a seeded fresh classifier of this size (0: none)")
    p.add_argument("--format", default="seer", choices=("seer", "torchvision", "timm"),
                   help="key layout: seer's own (torchvision's RegNet keys, timm's ViT keys), torchvision's, or timm's")
    p.add_argument("--encoder", default="base", choices=("base", "momentum"), help="MoCo v3: which encoder")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's initialisation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser(
        "eval",
        help="kNN, linear or low-shot probe of a backbone's frozen features on labelled images",
        formatter_class=_Formatter,
        description="Probe frozen features: `knn` (cosine, weighted votes exp(sim/0.07), k = 10, 20, 100), "
        "`linear` (logistic regression, weight decay chosen on a held-out 10 % of the training split) or "
        "`lowshot` (1, 5, 10 labelled images per class). BACKBONE is a run folder, a checkpoint or a "
        ".safetensors export. --data is an image-folder tree (class = folder), WebDataset shards with .cls, "
        "or Fashion-MNIST IDX files (e.g. /usr/share/datasets/fashion-mnist); its train/ and val|test/ "
        "parts (IDX: train-* and t10k-*) are used, or --test. Features are cached. Prints a table and "
        "writes JSON (a run folder: RUN/eval/, also logged to its TensorBoard).",
    )
    p.add_argument("protocol", choices=("knn", "linear", "lowshot"))
    p.add_argument("backbone", help="run folder, checkpoint folder, or .safetensors export")
    p.add_argument("--data", required=True, help="labelled images (see above)")
    p.add_argument("--test", default=None, help="labelled test images (default: the test split of --data)")
    p.add_argument("--train-limit", type=int, default=None, help="use this many training images (seeded subset)")
    p.add_argument("--test-limit", type=int, default=None, help="use this many test images (seeded subset)")
    p.add_argument("--size", type=int, default=None, help="input size in px (default: the run's largest crop)")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100], help="kNN: neighbour counts")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="lowshot: labelled images per class")
    p.add_argument("--encoder", default="base", choices=("base", "momentum"), help="MoCo v3 checkpoint: which encoder")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "seer" / "features"), help="feature cache")
    p.add_argument("--no-cache", action="store_true", help="extract features afresh and keep none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: RUN/eval/<protocol>_step<N>.json or beside the export)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("plot", help="a PNG of a run: loss, LR, images/s and kNN accuracy against steps",
                       formatter_class=_Formatter)
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/run.png)")
    p.set_defaults(fn=_cmd_plot)

    p = sub.add_parser("inspect", help="summarise a shard folder or a checkpoint", formatter_class=_Formatter)
    p.add_argument("path", nargs="?")
    p.add_argument("--env", action="store_true",
                   help="instead: the PIL (Pillow or Pillow-SIMD), JPEG decoder and resizer the data workers use here")
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

    p = sub.add_parser(
        "launch",
        help="submit `seer pretrain` as a Slurm job (submitit), or run it locally the same way",
        formatter_class=_Formatter,
        description="Submit pretraining through submitit: one task per GPU (CPU nodes: --tasks-per-node), "
        "ranks from Slurm, the warning signal --signal-delay s before the time limit saves a checkpoint and "
        "requeues the job, which resumes by itself; after a failure the job restarts from its newest checkpoint "
        "(--max-restarts). Writes the config snapshot and job logs to the job folder "
        "(default RUN_DIR/job), e.g. `seer launch configs/seer_regnety256gf_swav.yaml run.dir=/ckpt/seer "
        "--nodes 64 --gpus-per-node 8 --partition learn --time 4320`. Watch it with `seer status`.",
    )
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="data workers + 1 or more")
    p.add_argument("--mem", type=float, default=None, metavar="GB", help="memory per node")
    p.add_argument("--partition", default=None, help="default: the cluster's default partition")
    p.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit of each job (requeues get it again)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--signal-delay", type=int, default=180, metavar="S",
                   help="warning signal this long before the limit: the step + a synchronous save + slack")
    p.add_argument("--max-requeues", type=int, default=20, help="requeues (signal or hard) before the job gives up")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts after a failure (dead, stopped or hung rank, crash) without progress in between")
    p.add_argument("--folder", default=None, help="job folder (default: RUN_DIR/job)")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor and wait")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved config only")
    p.add_argument("--json", action="store_true", help="one JSON object: job_id, folder, run_dir, ...")
    p.set_defaults(fn=_cmd_launch)

    p = sub.add_parser(
        "status",
        help="state, step, loss, images/s, last checkpoint and requeues of a launched job",
        formatter_class=_Formatter,
    )
    p.add_argument("path", help="job folder or run folder of `seer launch`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from seer.config import ConfigError

    from data_pipeline.storage import StorageError

    from seer.engine.checkpoint_files import CheckpointSaveError
    from seer.engine.watchdog import RankFailure

    expected: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, StorageError,
                                                 RankFailure, CheckpointSaveError)
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
