"""What a run writes for people to read: JSONL + TensorBoard metrics, PNG grids, progress bars."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ng_jax import storage


def _to_py(x: Any):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # jax arrays
        return np.asarray(x).tolist()
    if isinstance(x, Mapping):
        return {str(k): _to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_py(v) for v in x]
    return x


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to `workdir/metrics.jsonl`; scalars and images to TensorBoard
    (`workdir/tensorboard`) and, with a `logging` config whose `wandb` is on, to Weights & Biases.

    `logging` (the run config's `logging` block, or None for the defaults): `tensorboard`,
    `tensorboard_images`, `wandb`, `wandb_project`, `wandb_entity`, `wandb_mode` ("offline": the run is
    written to `workdir/wandb` for `wandb sync` later; "online" needs `wandb login`), `wandb_run_id` ("" =
    one derived from the workdir, so that a resumed run appends to the same W&B run). `run_config` is
    recorded as the W&B run's config.

    `workdir` may be a bucket (gs://...): metrics.jsonl is rewritten there at each write, TensorBoard's events
    go there directly (tensorboardX uploads them at each flush and on close), and W&B, which needs a local
    directory, writes to `<tmp>/ng_jax_wandb/<run id>` instead (printed; `wandb sync` it from there)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True, logging=None,
                 run_config: Mapping | None = None, name: str = ""):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        get = (lambda k, d: logging.get(k, d)) if logging is not None else (lambda k, d: d)
        self.images = bool(get("tensorboard_images", True))
        if not enabled:
            return
        storage.makedirs(workdir)
        if tensorboard and get("tensorboard", True):
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if get("wandb", False):
            self._wandb = _start_wandb(workdir, get, run_config, name)

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({f"{prefix}{k}": _to_py(v) for k, v in metrics.items()})
        storage.append_text(self.path, json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=int(step))

    @property
    def wants_images(self) -> bool:
        return self.enabled and ((self._tb is not None and self.images) or self._wandb is not None)

    def write_image(self, step: int, tag: str, image) -> None:
        """An image (uint8 [H, W, 3], a PIL image or a PNG path) to TensorBoard (`tensorboard_images`) and W&B."""
        if not self.wants_images:
            return
        if isinstance(image, (str, os.PathLike)):
            with Image.open(io.BytesIO(storage.path(image).read_bytes())) as im:
                image = np.asarray(im.convert("RGB"))
        image = np.asarray(image, np.uint8)
        if self._tb is not None and self.images:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(workdir: str, get, run_config, name: str):
    try:
        import wandb
    except ImportError:
        from ng_jax.errors import UserError

        raise UserError("logging.wandb=True needs Weights & Biases: pip install wandb==0.30.0 "
                        "(or set logging.wandb=False)") from None
    mode = str(get("wandb_mode", "offline"))
    if mode not in ("offline", "online", "disabled"):
        from ng_jax.errors import UserError

        raise UserError(f"logging.wandb_mode={mode!r}: expected 'offline', 'online' or 'disabled'")
    run_id = str(get("wandb_run_id", "") or "") or "ngjax-" + hashlib.sha1(
        storage.canonical(workdir).encode()).hexdigest()[:12]
    directory = workdir
    if storage.is_remote(workdir):  # W&B writes its files to a local directory only
        directory = os.path.join(tempfile.gettempdir(), "ng_jax_wandb", run_id)
        os.makedirs(directory, exist_ok=True)
        print(f"W&B: the workdir {workdir} is a bucket; the W&B run's files go to {directory}")
    return wandb.init(project=str(get("wandb_project", "ng_jax")), entity=str(get("wandb_entity", "")) or None,
                      mode=mode, dir=directory, id=run_id, resume="allow", name=name or None,
                      config=_to_py(dict(run_config or {})))


def agg_figure(figsize, dpi: float | None = None):
    """A matplotlib Figure on its own Agg canvas. Not pyplot: code that runs inside a notebook (a training
    loop, a report) must not switch the notebook's backend (pyplot's global state) and hide its plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def norm_ratio_figure(result: Mapping, title: str = "") -> np.ndarray:
    """uint8 [H, W, 3]: an evaluation's norm ratio against sigma, CFG-free and for each of its variants."""
    fig = agg_figure((4.2, 3.0), dpi=80)
    ax = fig.subplots()
    curves = {"": result, **{k: v for k, v in (result.get("variants") or {}).items()}}
    for name, r in curves.items():
        by = np.asarray(r.get("norm_ratio_by_sigma") or [], np.float64)
        if by.size:
            ax.plot(by[:, 0], by[:, 1], "o-", ms=2, label=name or "plain")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.invert_xaxis()
    ax.set_xlabel("sigma")
    ax.set_ylabel("||v_theta|| / ||v_ref||")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # at least one curve (a "never" evaluation has none)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.path(path).read_text().splitlines() if line.strip()]


def image_grid(images: np.ndarray, *, cols: int | None = None, scale: int = 2,
               labels: Sequence[str] | None = None, pad: int = 2) -> Image.Image:
    """uint8 [N, H, W, 3] -> one PIL image, optionally with a caption under each tile."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"image_grid needs uint8 images, got {images.dtype}")
    n, h, w, _ = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    th, tw = h * scale, w * scale
    label_h = 12 if labels is not None else 0
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), pad + r * (th + label_h + pad)
        canvas.paste(Image.fromarray(images[i]).resize((tw, th), Image.NEAREST), (x, y))
        if labels is not None:
            draw.text((x, y + th), str(labels[i])[: max(4, tw // 6)], fill=(0, 0, 0))
    return canvas


def write_png(path: str, image, **savefig_kw) -> str:
    """A PIL image, or a matplotlib Figure (`savefig_kw`: e.g. dpi), as a PNG file: a local path or a bucket."""
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", **savefig_kw)
    else:
        image.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path


def save_grid(path: str, images: np.ndarray, **kwargs) -> str:
    return write_png(path, image_grid(images, **kwargs))


def progress(total: int, *, desc: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar on stderr (plain text lines when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=2.0 if not sys.stderr.isatty() else 0.1)


def write_json(path: str, obj: Any) -> None:
    """Atomic: a reader sees the whole file or the previous one (`storage.write_text`)."""
    storage.write_text(path, json.dumps(_to_py(obj), indent=2))


def scalars(result: dict) -> dict:
    """The plain numbers of a result dict (what goes into metrics.jsonl / TensorBoard)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_line(tag: str, r: dict) -> str:
    """`[eval TAG] reward=... norm_ratio=... fd=... precision=... recall=...`, one line per evaluation."""
    def fmt(key, digits):
        v = r.get(key)
        return "n/a" if v is None else f"{v:.{digits}f}"

    return (f"[eval {tag}] reward={fmt('reward', 4)} norm_ratio={fmt('norm_ratio', 4)} fd={fmt('fd', 3)} "
            f"precision={fmt('precision', 3)} recall={fmt('recall', 3)}")


def trim_metrics(path: str, step: int) -> None:
    """On resume, drop metric lines written after the restored step (they are about to be redone)."""
    target = storage.path(path)
    if not target.is_file():
        return
    lines = target.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass
        keep.append(line)
    if len(keep) != len(lines):
        storage.write_text(path, "".join(keep))


class StepMetrics:
    """Epoch means of an RL train step's metrics; the per-sigma-bucket norm ratios (`norm_ratio_by_bucket`,
    `bucket_count`) weighted by their sample counts and reported per bucket centre."""

    def __init__(self, bucket_centres: Sequence[float]):
        self.centres = list(bucket_centres)
        self.sums: dict = {}
        self.steps = 0

    def add(self, m: dict) -> None:
        counts = np.asarray(m["bucket_count"], np.float64)
        for key, val in m.items():
            if key in ("finite", "bucket_count"):
                continue
            val = np.asarray(val, np.float64)
            if key == "norm_ratio_by_bucket":
                val = val * counts
            self.sums[key] = self.sums.get(key, 0.0) + val
        self.sums["bucket_count"] = self.sums.get("bucket_count", 0.0) + counts
        self.steps += 1

    def record(self) -> dict:
        """`{metric: epoch mean}`; per-bucket norm ratios as `norm_ratio_sigma_<centre>`."""
        sums = dict(self.sums)
        counts = sums.pop("bucket_count", None)
        by_bucket = sums.pop("norm_ratio_by_bucket", None)
        record = {key: float(v) / max(self.steps, 1) for key, v in sums.items()}
        if by_bucket is not None:
            for c, total, n in zip(self.centres, by_bucket, counts):
                if n > 0:
                    record[f"norm_ratio_sigma_{c:.1f}"] = float(total / n)
        return record
