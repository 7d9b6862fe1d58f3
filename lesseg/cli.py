"""``lesseg`` command line: train, pretrain, eval, predict, export, splits, active export|import, data stats|check,
bench, viz, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PAUSED_EXIT, LessegError, Paused

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _load_cfg(args, extra: list[str] = (), methods: bool = True):
    from . import config

    overrides = list(args.overrides) + list(extra)
    if getattr(args, "out", None) and args.command == "train":
        overrides.append(f"out={args.out}")
    return config.load(args.config, overrides, methods=methods)


def cmd_train(args) -> int:
    from . import dist
    from .engine import train

    result = train(_load_cfg(args), resume=args.resume)
    if dist.is_main():  # once under torchrun
        keys = ("miou", "iou", "map", "ap", "mode", "metric", "score")  # segmentation or tags evaluation
        print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0


def cmd_pretrain(args) -> int:
    from . import dist
    from .pretrain import load, pretrain

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    result = pretrain(load(args.config, overrides), resume=args.resume)
    if dist.is_main():  # once under torchrun
        print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from . import dist
    from .engine.inference import evaluate_checkpoint

    result = evaluate_checkpoint(_load_cfg(args), args.checkpoint, net_name=args.net, split=args.split)
    if dist.is_main():  # once under torchrun (the process group is gone by now; torchrun's RANK tells)
        per_class = result.get("iou", result.get("ap", {}))  # segmentation IoU, or a classifier's AP
        for name, v in per_class.items():
            print(f"  {name:>16s}: {'  n/a' if v is None else f'{100 * v:5.2f}'}")
        metric = result["metric"]
        print(f"{'mIoU' if metric == 'miou' else metric} {100 * result[metric]:.2f} ({result['mode']})", file=sys.stderr)
        keys = ("miou", "iou", "acc", "map", "ap", "mode", "net")
        print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0


def _expand_inputs(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise LessegError(f"input not found: {p}")
    if not paths:
        raise LessegError("no input images found")
    return paths


def cmd_predict(args) -> int:
    from .engine.inference import load_checkpoint_net, predict_files

    net, cfg, info, _ = load_checkpoint_net(args.checkpoint, "cpu", args.overrides)
    sizes = {k: v for k, v in (("max_pixels", args.max_pixels), ("tile", args.tile)) if v is not None}
    written = predict_files(net, cfg, info, _expand_inputs(args.inputs), Path(args.out), args.overlay, **sizes)
    print(f"wrote {len(written)} mask(s) to {args.out}")
    return 0


def cmd_export(args) -> int:
    from .engine.inference import export_onnx, load_checkpoint_net

    net, cfg, _, _ = load_checkpoint_net(args.checkpoint, "cpu")
    diff = export_onnx(net, cfg, Path(args.out))
    print(f"wrote {args.out} (max |onnxruntime - torch| = {diff:.2e})")
    return 0


def cmd_splits(args) -> int:
    from .data import stream_source
    from .data.splits import write_complement, write_partition

    cfg = _load_cfg(args)
    split = args.split or cfg.data.streams[next(iter(cfg.data.streams))].split
    src = stream_source(cfg.data)
    out = Path(args.out)
    if args.labeled_list:  # the labeled images are chosen already: unlabeled.txt = the rest of the split
        result = write_complement(src, args.unlabeled_from or split, args.labeled_list, out)
    else:
        result = write_partition(src, split, args.labeled, args.seed, out)
        if args.unlabeled_from:  # e.g. VOC classic: labeled from `train`, unlabeled = the rest of `train_aug`
            rest = write_complement(src, args.unlabeled_from, str(result["labeled_path"]), out)
            result.update(unlabeled=rest["unlabeled"], unlabeled_path=rest["unlabeled_path"])
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.items()}))
    return 0


def _data_splits(cfg, only: str | None) -> list[tuple[str, object, bool]]:
    """(split, source, labeled) of every stream and the validation split (or just ``only``)."""
    from .data import stream_source

    if only:
        return [(only, stream_source(cfg.data), True)]
    labeled: dict[tuple[str, object], bool] = {}  # (split, cached source) -> read masks; each checked once
    for sc in cfg.data.streams.values():
        key = (sc.split, stream_source(cfg.data, sc))
        labeled[key] = labeled.get(key, False) or sc.labeled or sc.true_masks
    labeled[(cfg.data.val_split, stream_source(cfg.data))] = True
    return [(split, src, lab) for (split, src), lab in labeled.items()]


def _stream_problems(cfg) -> list[str]:
    """The streams the config's method reads that data.streams lacks, and streams smaller than one batch."""
    from .data import batch_problem, stream_source
    from .methods import METHODS

    try:
        method = METHODS.get(cfg.method.name)
    except KeyError as e:  # the config was loaded without the method schema (cmd_data)
        return [str(e.args[0])]
    needed = method.streams if method.config_streams is None else method.config_streams
    problems = [f"method {cfg.method.name} reads data stream {n!r}, which data.streams does not define "
                f"(it defines {list(cfg.data.streams)})" for n in needed if n not in cfg.data.streams]
    for name, sc in cfg.data.streams.items():
        try:
            n = len(stream_source(cfg.data, sc).samples(sc.split, strict=False))
        except LessegError:
            continue  # reported with the split below
        problem = batch_problem(name, n, sc.batch_size)
        if problem:
            problems.append(problem)
    return problems


def cmd_data(args) -> int:
    from .data import scan
    from .data.check import label_warning, resized_warning

    # the data commands start without torch (about a second); only check's stream check below imports the
    # methods, to learn which streams the config's method reads
    cfg = _load_cfg(args, methods=False)
    if args.action == "stats":
        split, src, _ = _data_splits(cfg, args.split)[0]
        samples = src.samples(split)
        problems, counts, _ = scan(src, samples, True, progress=True, desc=f"reading {split}", require_masks=False)
        if problems:
            raise LessegError(f"{len(problems)} bad file(s), run `lesseg data check`; first: {problems[0]}")
        total = int(counts.sum())
        print(f"{split}: {len(samples)} images, {total} labeled pixels", file=sys.stderr)
        warning = label_warning(src, counts, split)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        for name, c in zip(src.classes, counts.tolist()):
            print(f"  {name:>16s} {c:>12d}  {100 * c / max(total, 1):6.2f}%", file=sys.stderr)
        print(json.dumps({"split": split, "images": len(samples),
                          "pixels": dict(zip(src.classes, counts.tolist()))}))
        return 0
    bad = 0
    if not args.split:  # what the training refuses before reading a file: streams the method lacks, too few images
        for problem in _stream_problems(cfg):
            print(problem)
            bad += 1
    for split, src, labeled in _data_splits(cfg, args.split):
        try:
            samples = src.samples(split, strict=False)
        except LessegError as e:
            print(f"{split}: {e}")
            bad += 1
            continue
        problems, counts, resized = scan(src, samples, labeled, progress=True, desc=f"checking {split}")
        for p in problems:
            print(p)
        warnings = [label_warning(src, counts, split) if labeled else None, resized_warning(resized, split)]
        for warning in filter(None, warnings):
            print(f"warning: {warning}", file=sys.stderr)
        noted = f", {len(resized)} resized mask(s)" if resized else ""
        print(f"{split}: {len(samples)} images, {len(problems)} problem(s){noted}", file=sys.stderr)
        bad += len(problems)
    return 1 if bad else 0


def cmd_active(args) -> int:
    from .engine.annotation import export_requests, import_labels

    if args.action == "export":
        if not args.out:
            raise LessegError("lesseg active export RUN --out DIR: say where to write the requests")
        summary = export_requests(args.run, args.out, device=args.device)
        print(f"round {summary['round']}: {summary['regions']} regions ({summary['pixels']} pixels) in "
              f"{summary['images']} images written to {summary['out']}; instructions: {summary['out']}/README.txt",
              file=sys.stderr)
        print(json.dumps(summary))
        return 0
    if not args.labels:
        raise LessegError("lesseg active import RUN DIR|ZIP: say where the labels are")
    report = import_labels(args.run, args.labels)
    for line in report.lines():
        print(line, file=sys.stderr)
    print(f"resume the training with --resume (the run folder {args.run})", file=sys.stderr)
    print(json.dumps({"round": report.round, "pixels": report.labeled_pixels,
                      "requested_pixels": report.requested_pixels, "images": report.images,
                      "unlabeled_regions": report.unlabeled_regions, "outside": report.outside,
                      "missing": report.missing}))
    return 0


def _bench_pretrain(args) -> int:
    from .bench.pretrain import STARTS, bench_pretrain, print_pretrain_table

    if args.config:  # `lesseg bench pretrain k=v ...`: no config, only overrides
        args.overrides = [args.config, *args.overrides]
    quick = ["train.iters=30", "train.eval_every=0", "train.log_every=10"] if args.quick else []
    out = Path(args.out or ("runs/bench_pretrain_quick" if args.quick else "runs/bench_pretrain"))
    methods = tuple(args.methods.split(",")) if args.methods else ("supervised", "u2pl", "mean_teacher")
    starts = tuple(args.starts.split(",")) if args.starts else STARTS
    unknown = [s for s in starts if s not in STARTS]
    if unknown:
        raise LessegError(f"--starts: unknown start(s) {', '.join(unknown)}; choose from {', '.join(STARTS)}")
    rows = bench_pretrain(out, starts, methods, tuple(range(1 if args.quick else args.seeds)),
                          quick + list(args.overrides), ssl_iters=30 if args.quick else args.ssl_iters,
                          device=args.device, train_missing=not args.finished_only, family=args.dataset)
    print_pretrain_table(rows)
    print(json.dumps(rows))
    return 0


def _bench_weak(args) -> int:
    from .bench.weak import QUICK, WEAK_METHODS, bench_weak, print_weak_table, summarize_weak

    if args.config:  # `lesseg bench weak k=v ...`: no config, only overrides
        args.overrides = [args.config, *args.overrides]
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else WEAK_METHODS
    start = args.start or "imagenet"
    if start == "synthetic":
        raise LessegError("bench weak starts from imagenet (default) or scratch")
    out = Path(args.out or ("runs/bench_weak_quick" if args.quick else "runs/bench_weak"))
    seeds = tuple(range(1 if args.quick else args.seeds))
    rows = bench_weak(out, methods, seeds, (QUICK if args.quick else []) + list(args.overrides), args.device,
                      train_missing=not args.finished_only, family=args.dataset, start=start)
    table = summarize_weak(rows)
    print_weak_table(table)
    print(json.dumps({"table": table, "rows": rows}))
    return 0


def _bench_active(args) -> int:
    from .bench.active import (
        QUICK,
        VARIANTS,
        bench_active,
        curve_points,
        print_active_table,
        summarize_active,
    )
    from .methods.active.pictures import labels_curve

    if args.config:  # `lesseg bench active k=v ...`: no config, only overrides
        args.overrides = [args.config, *args.overrides]
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else tuple(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LessegError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out or ("runs/bench_active_quick" if args.quick else "runs/bench_active"))
    seeds = tuple(range(1 if args.quick else args.seeds))
    rows = bench_active(out, variants, seeds, (QUICK if args.quick else []) + list(args.overrides), args.device,
                        train_missing=not args.finished_only, family=args.dataset)
    table = summarize_active(rows)
    print_active_table(table)
    if rows:
        print(f"picture: {labels_curve(curve_points(rows), out / 'labels_curve.png')}", file=sys.stderr)
    print(json.dumps({"table": table, "rows": rows}))
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .data.sources.folder import ShapesSource

    if args.kind == "select":
        size = [int(v) for v in (args.size or "1024x2048").split("x")]
        rows = bench.bench_select(size[0], size[1], args.classes, repeat=args.repeat)
        bench.print_select_table(rows, size[0], size[1], args.classes)
        print(json.dumps(rows))
        return 0
    if args.kind == "active":
        return _bench_active(args)
    if args.kind == "pretrain":
        return _bench_pretrain(args)
    if args.kind == "weak":
        return _bench_weak(args)
    if args.kind == "speed":
        if not args.config:
            raise LessegError("bench speed needs a CONFIG")
        cfg = _load_cfg(args, ["data.check=false", "train.progress=false"])
        if args.profile:
            print(bench.profile_steps(cfg, iters=args.iters, warmup=args.warmup))
            return 0
        row = bench.bench_speed(cfg, iters=args.iters, warmup=args.warmup)
        bench.print_speed_table([row])
        print(json.dumps(row))
        return 0
    if args.config:  # `lesseg bench semi k=v ...`: no config, only overrides
        args.overrides = [args.config, *args.overrides]
    start = args.start or ("synthetic" if args.pretrain else "scratch")
    suffix = {"synthetic": "_pretrained", "imagenet": "_imagenet", "scratch": ""}[start]
    suffix += "" if args.dataset == "shapes" else f"_{args.dataset}"
    out = Path(args.out or ("runs/bench_semi_quick" if args.quick else "runs/bench_semi") + suffix)
    quick = ["train.iters=30", "train.eval_every=0", "train.log_every=10"] if args.quick else []
    methods = tuple(args.methods.split(",")) if args.methods else bench.SEMI_METHODS
    seeds = tuple(range(1 if args.quick else args.seeds))
    budgets = tuple(args.budgets.split(",")) if args.budgets else ("1-16",) if args.quick else ("1-16", "1-8")
    for b in budgets:
        if b not in ShapesSource.partitions:
            raise LessegError(f"unknown label budget {b!r}; shapes has {', '.join(ShapesSource.partitions)}")
    for m in methods:
        if m not in bench.SEMI_METHODS:
            raise LessegError(f"unknown method {m!r} for bench semi; known: {', '.join(bench.SEMI_METHODS)}")
    if args.cost_only and (args.no_cost or args.finished_only):
        raise LessegError("--cost-only excludes --no-cost and --finished-only")
    rows = [] if args.cost_only else bench.bench_semi(out, methods, budgets, seeds, quick + list(args.overrides),
                                                      args.device, pretrain={"synthetic": True, "imagenet": "imagenet",
                                                                             "scratch": False}[start],
                                                      train_missing=not args.finished_only, family=args.dataset)
    table = bench.summarize_semi(rows)
    if rows:
        bench.print_semi_table(table, rows)
    costs = [] if args.no_cost or args.finished_only else bench.bench_costs(
        methods, out, list(args.overrides), args.device, iters=3 if args.quick else args.iters)
    out.mkdir(parents=True, exist_ok=True)
    name = "cost.json" if args.cost_only else "summary_so_far.json" if args.finished_only else "summary.json"
    (out / name).write_text(json.dumps({"runs": rows, "table": table, "cost": costs}, indent=2))
    print(json.dumps({"table": table, "cost": costs}))
    return 0


def cmd_viz(args) -> int:
    from .viz import curves_figure, entropy_figure, runs_figure, weak_figures

    if not args.checkpoint and not args.runs and not args.weak:
        raise LessegError("lesseg viz: give --checkpoint (one run's pictures), --runs (several runs' curves) "
                          "and/or --weak (a weakly supervised pipeline's stages)")
    if args.config and not args.weak:
        raise LessegError("lesseg viz: --config is the config of a --weak run (without its pipeline.yaml)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.weak:
        cfg = _load_cfg(args) if args.config else None
        written += weak_figures(args.weak, out, n=args.n, cfg=cfg)
    if args.checkpoint:
        written.append(entropy_figure(args.checkpoint, out / "entropy.png", n=args.n))
        metrics = Path(args.checkpoint).parent / "metrics.jsonl"
        if metrics.is_file():
            written.append(curves_figure(metrics, out / "curves.png"))
    if args.runs:
        written.append(runs_figure(args.runs, out / "runs.png"))
    for w in written:
        if w is not None:
            print(f"wrote {w}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, iters=args.iters)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lesseg", description="Label-efficient semantic segmentation.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iters=100")

    sp = sub.add_parser("train", help="train a method from a config")
    with_config(sp)
    sp.add_argument("--out", help="run folder (default: the config's `out`, or runs/<config name>; packaged configs: runs/<family>/<name>)")
    sp.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("pretrain", help="self-supervised encoder pretraining on unlabeled images; model.pretrained "
                                         "takes <out>/encoder.pt (last line: JSON)")
    with_config(sp)
    sp.add_argument("--out", help="run folder (default: the config's `out`, or runs/pretrain_<config name>)")
    sp.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("eval", help="evaluate a checkpoint (last line: JSON with miou and per-class iou)")
    with_config(sp)
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--split", help="split to evaluate (default: data.val_split)")
    sp.add_argument("--net", help="which of the method's networks (student, teacher, net1, ...; default: the one "
                                  "the method evaluates)")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("predict", help="write palette PNG masks for images")
    sp.add_argument("inputs", nargs="+", help="image files or folders")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--overlay", action="store_true", help="also write image/prediction overlays")
    sp.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    sp.add_argument("--max-pixels", type=int,
                    help="images with more pixels are predicted in overlapping tiles, in bounded memory "
                         "(default 2048x2048; eval.mode=slide always tiles, with its window and stride)")
    sp.add_argument("--tile", type=int, help="tile side for large images (default 1024)")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("export", help="export the network to ONNX, checked with onnxruntime")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("splits", help="write labeled/unlabeled split files")
    with_config(sp)
    amount = sp.add_mutually_exclusive_group(required=True)
    amount.add_argument("--labeled", help="draw this many labeled images: count (92) or fraction (1/16, 0.0625)")
    amount.add_argument("--labeled-list", metavar="FILE",
                        help="the labeled images are those FILE lists (a split name or file): write only "
                             "unlabeled.txt, the rest of the split (the split 'SPLIT - FILE')")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--split", help="split to partition (default: the first stream's)")
    sp.add_argument("--unlabeled-from", help="take the unlabeled part from this split instead (minus the labeled)")
    sp.add_argument("--out", required=True, help="folder for labeled.txt / unlabeled.txt")
    sp.set_defaults(func=cmd_splits)

    sp = sub.add_parser("active", help="a person as the annotator of an active-learning run paused at a round "
                        "(method.annotator=human): export the requested regions, import the labels")
    sp.add_argument("action", choices=["export", "import"])
    sp.add_argument("run", help="the run folder (holds last.pt)")
    sp.add_argument("labels", nargs="?", help="import: a folder of labels/<name>.png (class indices, 255 = not "
                    "labeled), or a CVAT 'Segmentation mask 1.1' export (zip or unpacked)")
    sp.add_argument("--out", help="export: a new folder for the images, regions, pre-labels and CVAT archive")
    sp.add_argument("--device", default="cpu", help="export: device of the pre-label predictions")
    sp.set_defaults(func=cmd_active)

    sp = sub.add_parser("data", help="dataset statistics and checks")
    sp.add_argument("action", choices=["stats", "check"])
    with_config(sp)
    sp.add_argument("--split", help="one split (default: stats: the first stream's; check: all)")
    sp.set_defaults(func=cmd_data)

    sp = sub.add_parser("bench", help="benchmarks that print tables")
    sp.add_argument("kind", choices=["speed", "semi", "select", "active", "pretrain", "weak"],
                    help="speed: throughput and peak memory of CONFIG; semi: every semi-supervised method on "
                         "shapes at 1/16 and 1/8 over seeds, plus the method-specific cost per step; select: "
                         "RIPU's score and selection time for one image; active: RIPU and its baselines, "
                         "synthetic -> real shapes, per label budget; pretrain: SupOnly, U2PL and Mean Teacher "
                         "at 1/16 from random init, from lesseg pretrain on the unlabeled images and from the "
                         "synthetic encoder; weak: every weakly supervised pipeline (tags only) against the "
                         "fully supervised network, stage by stage")
    sp.add_argument("--ssl-iters", type=int, default=3000, help="pretrain: steps of lesseg pretrain")
    sp.add_argument("--starts", help="pretrain: comma-separated subset of the starts (scratch, ssl, synthetic; "
                    "default: all)")
    sp.add_argument("config", nargs="?", help="YAML config (speed)")
    sp.add_argument("--dataset", default="shapes", help="semi, active: the embedded dataset whose packaged configs "
                    "are run (shapes, fashion)")
    sp.add_argument("--variants", help="active: comma-separated subset of the variants (default: all)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides")
    sp.add_argument("--iters", type=int, default=20, help="timed steps")
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--profile", action="store_true",
                    help="speed: print torch.profiler's per-op table of --iters steps instead of the timing")
    sp.add_argument("--quick", action="store_true", help="semi: a short smoke run (1 seed, 1/16, 30 steps); active: "
                    "1 seed, 150 steps; weak: 1 seed, 60 steps a stage")
    sp.add_argument("--seeds", type=int, default=2, help="semi: number of seeds")
    sp.add_argument("--methods", help="semi, weak: comma-separated subset")
    sp.add_argument("--budgets", help="semi: comma-separated label budgets (default 1-16,1-8; also 1-4, 1-2)")
    sp.add_argument("--no-cost", action="store_true",
                    help="semi: skip the cost-per-step measurement (e.g. while other runs load the machine)")
    sp.add_argument("--cost-only", action="store_true",
                    help="semi: only the cost-per-step measurement of --methods, no training (an idle machine)")
    sp.add_argument("--out", help="semi: run folder (finished runs are reused)")
    sp.add_argument("--finished-only", action="store_true",
                    help="semi, active, weak: train nothing, print the table of the finished runs and list the others")
    sp.add_argument("--pretrain", action=argparse.BooleanOptionalAction, default=True,
                    help="semi: start every run from the encoder of a supervised run on synthetic shapes (trained "
                         "first, once) and fine-tune it at a tenth of the head's lr, as the papers do from ImageNet; "
                         "--no-pretrain: from scratch")
    sp.add_argument("--start", choices=["synthetic", "imagenet", "scratch"],
                    help="semi: what every run starts from: the synthetic-shapes encoder (the default, = --pretrain), "
                         "torchvision's ImageNet MobileNetV2 (model.encoder=mobilenetv2_100), or random init "
                         "(= --no-pretrain)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--size", help="select: HxW of the score map (default 1024x2048)")
    sp.add_argument("--classes", type=int, default=19, help="select: number of classes (default 19)")
    sp.add_argument("--repeat", type=int, default=3, help="select: timed repetitions (the median is shown)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("viz", help="entropy maps and reliable/unreliable pixels; training curves; several runs "
                        "compared (--runs); a weakly supervised pipeline's stages (--weak)")
    sp.add_argument("--checkpoint", help="a run's checkpoint: its entropy maps and training curves (a weak "
                    "pipeline's stages: --weak)")
    sp.add_argument("--runs", nargs="+", help="run folders whose mIoU, loss and pseudo-label curves are "
                    "compared in one figure (runs.png)")
    sp.add_argument("--weak", metavar="RUN", help="the run folder of a weakly supervised pipeline (cam, ae, psl, "
                    "stc, mil: the folder with stages.json): for its first --n tagged training images, the CAMs "
                    "of their tags (weak_cams.png), each erasing step's regions (weak_erasing.png), each "
                    "pseudo-mask stage's masks next to the true ones and the final network's prediction "
                    "(weak_masks.png)")
    sp.add_argument("--config", help="with --weak: the run's config (and key=value overrides), for a run folder "
                    "without pipeline.yaml")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    sp.add_argument("--out", required=True)
    sp.add_argument("--n", type=int, default=6, help="number of images (--checkpoint: unlabeled ones; --weak: "
                    "the first tagged training images)")
    sp.set_defaults(func=cmd_viz)

    sp = sub.add_parser("demo", help="generate shapes, train with 1/16 and all labels, compare")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--quick", action="store_true", help="a short smoke run (40 steps per run)")
    sp.add_argument("--iters", type=int, help="steps per run (default: sized for ~10 minutes on 2 CPU cores)")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow options (`eval CONFIG --checkpoint CKPT k=v`), which argparse
    # alone does not allow once the `overrides` positional has been consumed
    if extra and hasattr(args, "config") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except Paused as e:
        import os

        from . import dist

        if dist.is_main():  # once under torchrun
            print(f"lesseg: paused: {e}", file=sys.stderr)
            print(json.dumps({"paused": str(e)}))
        # torchrun reports any non-zero exit of a worker as a failure (with tracebacks): there, a pause exits 0
        # and the JSON line above tells
        return PAUSED_EXIT if int(os.environ.get("WORLD_SIZE", "1")) == 1 else 0
    except LessegError as e:
        print(f"lesseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lesseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
