"""Pictures: palette masks, overlays and figure grids (what people would rather look at than read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data.base import IGNORE
from .data.sources.voc import voc_palette


def colorize(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A palette ("P" mode) PNG image of a label map; 255 (ignore) is white."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(_palette_with_ignore(num_classes).ravel().tolist())
    return im


def color_array(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """H,W labels -> H,W,3 uint8 colours (ignore = white)."""
    return _palette_with_ignore(num_classes)[labels.astype(np.uint8)]


def _palette_with_ignore(num_classes: int) -> np.ndarray:
    """256-entry palette: the VOC colours for the classes, white for everything else (255 = ignore)."""
    pal = np.full((256, 3), 255, np.uint8)
    pal[:num_classes] = voc_palette(num_classes)
    return pal


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over the image (background and ignore left as they are)."""
    colors = color_array(labels, num_classes).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colors * alpha
    keep = (labels == 0) | (labels == IGNORE)
    blend[keep] = image[keep]
    return blend.astype(np.uint8)


def grid_figure(rows: list[list[np.ndarray]], titles: list[str], path: str | Path, row_labels: list[str] | None = None,
                cmap: str | None = None) -> Path:
    """Save a grid of images (rows x columns, column titles) with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(titles)
    fig, axes = plt.subplots(nr, nc, figsize=(2.0 * nc, 2.0 * nr), squeeze=False)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            ax = axes[r][c]
            ax.imshow(im, cmap=cmap if im.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heat(x: np.ndarray, vmax: float | None = None, cmap: str = "magma") -> np.ndarray:
    """A float map -> H,W,3 uint8 colours (0..vmax)."""
    import matplotlib

    top = vmax if vmax else max(float(x.max()), 1e-12)
    return (matplotlib.colormaps[cmap](np.clip(x / top, 0, 1))[..., :3] * 255).astype(np.uint8)


def metric_series(metrics_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a metrics.jsonl as ``name -> [(step, value)]``: training terms under their names,
    evaluation numbers as ``eval <name>`` (learning rate, speed and pixel accuracy left out)."""
    import json

    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") not in ("train", "eval"):
            continue
        for k, v in rec.items():
            if k in ("step", "lr", "it_per_s", "acc") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            series.setdefault(k if rec["event"] == "train" else f"eval {k}", []).append((rec["step"], v))
    return series


def _save(fig, path: str | Path, layout: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _panels(n: int, width: float = 3.2, height: float = 2.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def curves_figure(metrics_path: str | Path, path: str | Path) -> Path | None:
    """Every scalar logged in metrics.jsonl against the step, one panel each (loss terms, CPS overlap,
    U2PL reliable share, pseudo-label quality with the true class-0 share dashed in the pl_c0 panel, eval
    mIoU). None when the file holds no training events."""
    series = metric_series(metrics_path)
    if not series:
        return None
    reference = {"pl_c0": series.pop("true_c0")} if "true_c0" in series and "pl_c0" in series else {}
    fig, axes = _panels(len(series))
    for ax, (name, pts) in zip(axes, sorted(series.items())):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        if name in reference:  # the pseudo-labels' class-0 share against the masks' (dashed)
            ref = reference[name]
            ax.plot([p[0] for p in ref], [p[1] for p in ref], "--", color="gray", label="true_c0")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path)


# what `lesseg viz --runs` compares: how well each network does, how it fits its labels, and how good its
# pseudo-labels are (accuracy, mIoU against the true masks where the stream has them, background share)
COMPARED = ("eval miou", "loss_sup", "loss", "pl_miou", "pl_acc", "pl_c0")


def runs_figure(run_dirs: list[str | Path], path: str | Path, names: list[str] | None = None) -> Path:
    """Several runs' curves in one figure, one line per run (its folder name, or ``names``), a panel per
    quantity of ``COMPARED`` that at least one run logged; the pl_c0 panel also shows the true background
    share (dotted, black) where a run logged it. Runs without a metrics.jsonl are refused by name."""
    missing = [str(r) for r in run_dirs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        from .errors import LessegError

        raise LessegError(f"no metrics.jsonl in {', '.join(missing)}: not a run folder (or not started)")
    names = names or [_run_name(Path(r), run_dirs) for r in run_dirs]
    all_series = [metric_series(Path(r) / "metrics.jsonl") for r in run_dirs]
    shown = [k for k in COMPARED if any(k in s for s in all_series)]
    fig, axes = _panels(len(shown), 3.6, 2.8)
    styles = run_styles(len(names))  # a run keeps its colour and line style in every panel
    for ax, key in zip(axes, shown):
        for name, series, (color, style) in zip(names, all_series, styles):
            if key in series:
                pts = series[key]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None,
                        color=color, linestyle=style, label=name)
        if key == "pl_c0":
            ref = next((s["true_c0"] for s in all_series if "true_c0" in s), None)
            if ref:
                ax.plot([p[0] for p in ref], [p[1] for p in ref], ":", color="black", label="true background")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linestyle=ls, label=n) for n, (c, ls) in zip(names, styles)]
    if "pl_c0" in shown and any("true_c0" in s for s in all_series):
        handles.append(Line2D([], [], color="black", linestyle=":", label="true background share (pl_c0)"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 * ((len(handles) + 4) // 5)))
    return _save(fig, path, layout=False)


def run_styles(n: int) -> list[tuple[str, str]]:
    """``n`` distinct (colour, line style) pairs: the 10 default colours without grey (the true-background
    reference is drawn in black dots), solid first, then dashed, dash-dotted, dotted."""
    colors = [f"C{i}" for i in range(10) if i != 7]
    return [(colors[i % len(colors)], ("-", "--", "-.", ":")[i // len(colors) % 4]) for i in range(n)]


def _run_name(run: Path, runs: list) -> str:
    """A run's label: its folder name, with its parents' names while two runs would share it (bench layouts
    such as <budget>/<method>/seed0)."""
    parts = run.resolve().parts
    for depth in range(1, len(parts) + 1):
        label = "/".join(parts[-depth:])
        if sum("/".join(Path(r).resolve().parts[-depth:]) == label for r in runs) == 1:
            return label
    return str(run)


def entropy_figure(checkpoint: str | Path, path: str | Path, n: int = 6) -> Path:
    """U2PL's Figure 2 for a checkpoint: for ``n`` unlabeled images (the config's ``unlabeled`` stream, else
    the validation split), the prediction, the entropy map of the evaluated network (the teacher for U2PL)
    and the reliable / unreliable partition at the checkpoint's drop percentage alpha_t (per image)."""
    import torch

    from .data import build_source, stream_source
    from .engine.evaluate import predict_probs
    from .engine.inference import image_tensor, load_checkpoint_net
    from .methods.common import entropy
    from .methods.u2pl import entropy_split
    from .models import class_map

    net, cfg, info, state = load_checkpoint_net(checkpoint)
    stream = cfg.data.streams.get("unlabeled")
    src = stream_source(cfg.data, stream) if stream is not None else build_source(cfg.data.dataset, cfg.data.root,
                                                                                      dict(cfg.data.options))
    samples = src.samples(stream.split if stream is not None else cfg.data.val_split)[:n]
    alpha0 = float(cfg.method.drop_percent) if "drop_percent" in cfg.method else 20.0
    epochs = max(1, info.max_iters // max(1, info.iters_per_epoch))
    alpha = alpha0 * (1.0 - (state["step"] // max(1, info.iters_per_epoch)) / epochs)
    rows = []
    with torch.no_grad():
        for s in samples:
            image = src.read_image(s.image)
            logits = predict_probs(net, image_tensor(image, cfg), cfg.eval, list(cfg.data.crop_size),
                                   info.num_classes).clamp_min(1e-12).log()
            ent = entropy(logits)  # 1,H,W
            reliable, unreliable = entropy_split(ent, torch.ones_like(ent, dtype=torch.bool), max(alpha, 1e-6))
            part = np.full((*ent.shape[-2:], 3), 128, np.uint8)  # grey: neither (between the two percentiles)
            part[reliable[0].numpy()] = (40, 170, 60)
            part[unreliable[0].numpy()] = (210, 40, 40)
            rows.append([image, color_array(class_map(logits)[0].numpy(), info.num_classes),
                         heat(ent[0].numpy(), vmax=float(np.log(info.num_classes))), part])
    titles = ["unlabeled image", "prediction", "entropy (0..ln C)",
              f"reliable (green) / unreliable (red)\nalpha_t = {alpha:.1f}%"]
    return grid_figure(rows, titles, path)


# -- weakly supervised pipelines -------------------------------------------------------------------------------

Panel = tuple[list[list[np.ndarray]], list[str], list[str]]  # rows of cells, column titles, row labels


def _blend(image: np.ndarray, colors: np.ndarray, where: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """``colors`` over ``image`` at ``alpha`` (only ``where``, H,W bool, when given)."""
    mixed = (image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha).astype(np.uint8)
    if where is None:
        return mixed
    out = image.copy()
    out[where] = mixed[where]
    return out


def _stage_products(run: Path, status: list[dict]) -> dict[str, Path]:
    """Each stage's product under ``run`` (found from the run folder, wherever the run was trained from): a
    task stage's folder, a training stage's ``last.pt``, a given stage's checkpoint as recorded."""
    out = {}
    for k, s in enumerate(status):
        folder = run if k == len(status) - 1 else run / s["stage"]
        out[s["stage"]] = (Path(s["product"]) if s["state"] == "given" else
                           folder / "last.pt" if s["kind"] == "train" else folder)
    return out


def weak_panels(run: str | Path, n: int = 6, cfg=None) -> dict[str, Panel]:
    """The pictures of a weakly supervised pipeline's run folder (``stages.json``), for the first ``n`` images
    of its tagged stream ``labeled``, as grids of cells by kind:

    - ``cams`` (a run with a ``classifier`` stage): each image's CAM of every class it is tagged with (the
      run's scales and flip), over the image; one column per class tagged in a shown image;
    - ``erasing`` (adversarial erasing runs): for every erasing step that ran, the image as the step's
      classifier saw it (the earlier steps' regions at the mean pixel) with the regions the step mined in
      their class colours (white: two classes);
    - ``masks``: the image, its true mask where the stream's images have masks, each pseudo-mask stage's mask
      (stages that wrote no mask of the image: grey) and the final network's prediction (``last.pt``).

    Skipped stages are left out (their product is an earlier one's). ``cfg``: the run's config, by default
    ``<run>/pipeline.yaml``."""
    import json

    import torch
    from PIL import Image

    from . import config as config_mod
    from .data import stream_source
    from .data.loader import SegDataset
    from .data.writer import safe_stems
    from .engine.evaluate import predict_probs
    from .engine.inference import image_tensor, load_checkpoint_net
    from .engine.stages import PIPELINE, STATUS
    from .errors import LessegError
    from .methods.cam import load_classifier
    from .methods.weak.cam import multiscale_cams
    from .methods.weak.erasing import STATE, fill_values, load_regions
    from .models import class_map

    run = Path(run)
    if not (run / STATUS).is_file():
        raise LessegError(f"{run} has no {STATUS}: not the run folder of a pipeline of stages (cam, ae, psl, stc, "
                          "mil, self_training)")
    status = json.loads((run / STATUS).read_text())
    if cfg is None:
        if not (run / PIPELINE).is_file():
            raise LessegError(f"{run} has no {PIPELINE} (runs of older versions did not write it): give the "
                              "run's config, lesseg viz --weak RUN --config CONFIG [key=value ...]")
        cfg = config_mod.load(run / PIPELINE)
    if "labeled" not in cfg.data.streams:
        raise LessegError(f"the config of {run} has no stream 'labeled' (the tagged images of a weak run)")
    products = _stage_products(run, status)
    done = [s for s in status if s["state"] in ("done", "given")]
    sc = cfg.data.streams.labeled
    src = stream_source(cfg.data, sc)
    every = src.samples(sc.split)
    samples, stems = every[:n], safe_stems([s.name for s in every])[:n]
    scored = bool(samples) and all(s.mask is not None for s in samples)
    data = SegDataset(src, samples, train=False, labeled=scored, mean=list(cfg.data.mean), std=list(cfg.data.std))
    names, nc = list(src.classes), src.num_classes
    bg = cfg.method.bg_class if "bg_class" in cfg.method else 0
    loaded = [data.load(i) for i in range(len(samples))]
    images = [image for image, _ in loaded]
    tags = [sorted(set(s.tags or ()) - {bg}) for s in samples]
    labels = [f"{s.name}\n{', '.join(names[c] for c in t)}" for s, t in zip(samples, tags)]
    panels: dict[str, Panel] = {}

    def blank(image: np.ndarray) -> np.ndarray:
        return np.full_like(image, 235)

    if any(s["stage"] == "classifier" for s in done):
        net = load_classifier(products["classifier"], names)
        m = cfg.method
        scales, flip = (list(m.scales), bool(m.flip)) if "scales" in m else ([1.0], False)
        shown = sorted({c for t in tags for c in t})
        rows = []
        for i, image in enumerate(images):
            onehot = torch.zeros(1, nc)
            onehot[0, tags[i]] = 1.0
            with torch.no_grad():
                cams = multiscale_cams(net.cam, data[i]["image"][None], onehot, scales, flip)[0]
            rows.append([image, *[_blend(image, heat(cams[c].numpy(), vmax=1.0)) if c in tags[i] else blank(image)
                                  for c in shown]])
        panels["cams"] = (rows, ["image", *[f"CAM {names[c]}" for c in shown]], labels)

    steps = [s["stage"] for s in done if s["kind"] == "task" and (products[s["stage"]] / STATE).is_file()]
    if steps:
        pixel, _ = fill_values(cfg.data.mean, cfg.data.std)
        rows, titles = [[image] for image in images], ["image"]
        for t, step in enumerate(steps):
            record = json.loads((products[step] / STATE).read_text())
            titles.append(f"{step}: {'mined' if record['mined'] else 'stopped'}")
            for i, image in enumerate(images):
                size = image.shape[:2]
                now = load_regions(products[step] / "regions" / f"{stems[i]}.npz", nc, size).numpy()
                before = (load_regions(products[steps[t - 1]] / "regions" / f"{stems[i]}.npz", nc, size).numpy()
                          if t else np.zeros_like(now))
                seen = image.copy()
                seen[before.any(0)] = pixel
                new = now & ~before  # C,H,W
                mined = np.where(new.sum(0) > 1, 255, new.argmax(0))
                rows[i].append(_blend(seen, color_array(mined, nc), new.any(0)))
        panels["erasing"] = (rows, titles, labels)

    rows, titles = [[image] for image in images], ["image"]
    if scored:
        titles.append("true mask")
        for row, (_, true) in zip(rows, loaded):
            row.append(color_array(true, nc))
    for s in done:
        folder = products[s["stage"]]
        if s["kind"] != "task" or not (folder / "masks").is_dir():
            continue
        miou = (s.get("metrics") or {}).get("pseudo_miou")
        titles.append(s["stage"] + (f" (mIoU {100 * miou:.1f})" if miou is not None else ""))
        for row, stem in zip(rows, stems):
            path = folder / "masks" / f"{stem}.png"
            row.append(color_array(np.array(Image.open(path)), nc) if path.is_file() else blank(row[0]))
    if (run / "last.pt").is_file():
        net, ckcfg, _, _ = load_checkpoint_net(run / "last.pt")
        crop = list(ckcfg.eval.crop_size or ckcfg.data.crop_size)
        titles.append("final network")
        with torch.no_grad():
            for row, image in zip(rows, images):
                probs = predict_probs(net, image_tensor(image, ckcfg), ckcfg.eval, crop, nc)
                row.append(color_array(class_map(probs)[0].numpy(), nc))
    panels["masks"] = (rows, titles, labels)
    return panels


def weak_figures(run: str | Path, out: str | Path, n: int = 6, cfg=None) -> list[Path]:
    """:func:`weak_panels` as ``weak_cams.png``, ``weak_erasing.png`` and ``weak_masks.png`` in ``out`` (the
    kinds the run has)."""
    return [grid_figure(rows, titles, Path(out) / f"weak_{kind}.png", row_labels=labels)
            for kind, (rows, titles, labels) in weak_panels(run, n, cfg).items()]
