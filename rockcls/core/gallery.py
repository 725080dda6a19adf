"""Galleries of hard examples: which images to show, one grid of captioned thumbnails, and the
table that names their files, logged to a run.

A gallery is small by construction: at most ``MAX_GALLERY`` thumbnails of ``THUMB`` pixels, and
only the images shown are read again (from the source the caller trains on)."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rockcls.core import tracking
from rockcls.core.config import MAX_GALLERY
from rockcls.core.errors import RockclsError
from rockcls.core.text import shown, utf8_escaped

THUMB = 96  # pixels, the longer side of a thumbnail
FONT_SIZE = 10
LINE = 12  # pixels per caption line
PAD = 4
MAX_COLUMNS = 8
WRONG, RIGHT, TEXT = (190, 20, 20), (20, 120, 40), (30, 30, 30)


@dataclass
class Example:
    """One image of a gallery; ``predicted`` is empty (and ``prob`` NaN) where no prediction
    is known (the hard-negative memory keeps losses only)."""

    row: int
    path: str
    label: str
    predicted: str
    prob: float
    loss: float


def sample_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each row (logits may be log-probabilities: the result is the same)."""
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def hardest(rows: np.ndarray, logits: np.ndarray, labels: np.ndarray, *, paths: Sequence[str],
            classes: Sequence[str], n: int) -> list[Example]:
    """The ``n`` highest-loss rows, highest first, with their prediction and its probability."""
    loss = sample_losses(logits, labels)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    preds = probs.argmax(1)
    top = np.argsort(-loss, kind="stable")[:min(n, MAX_GALLERY)]
    return [Example(int(rows[i]), paths[rows[i]], classes[labels[i]], classes[preds[i]], float(probs[i, preds[i]]),
                    float(loss[i])) for i in top]


def highest(rows: np.ndarray, losses: np.ndarray, labels: np.ndarray, *, paths: Sequence[str],
            classes: Sequence[str], n: int) -> list[Example]:
    """The ``n`` rows of highest ``losses``, highest first, without predictions."""
    top = np.argsort(-np.asarray(losses), kind="stable")[:min(n, MAX_GALLERY)]
    return [Example(int(rows[i]), paths[rows[i]], classes[labels[i]], "", math.nan, float(losses[i])) for i in top]


def table(examples: Sequence[Example]) -> str:
    """CSV (path, label, predicted, prob, loss) in gallery order: where to find the files."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "predicted", "prob", "loss"])
    for e in examples:
        writer.writerow([utf8_escaped(e.path), e.label, e.predicted, "" if math.isnan(e.prob) else f"{e.prob:.4f}",
                         f"{e.loss:.4f}"])
    return out.getvalue()


def captions(e: Example) -> list[tuple[str, tuple[int, int, int]]]:
    """The caption lines under a thumbnail and their colours (the prediction red when wrong). The
    numbers have a line of their own: a long class name is shortened, never them."""
    name = shown(os.path.basename(e.path))
    if not e.predicted:
        return [(f"true {e.label}", TEXT), (f"loss {e.loss:.2f}", TEXT), (name, TEXT)]
    colour = RIGHT if e.predicted == e.label else WRONG
    return [(f"true {e.label}", TEXT), (f"pred {e.predicted}", colour), (f"p {e.prob:.2f}  loss {e.loss:.2f}", colour),
            (name, TEXT)]


def render(images: Sequence[np.ndarray | None], lines: Sequence[list[tuple[str, tuple[int, int, int]]]],
           *, thumb: int = THUMB) -> Image.Image:
    """One RGB grid: each image scaled to fit ``thumb`` pixels, its caption lines below it
    (an image that could not be read is a grey tile)."""
    n = len(images)
    cols = min(MAX_COLUMNS, max(1, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    depth = max((len(c) for c in lines), default=0)
    tile_w, tile_h = thumb + 2 * PAD, thumb + 2 * PAD + depth * LINE
    grid = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    for i, (img, caption) in enumerate(zip(images, lines)):
        x, y = (i % cols) * tile_w + PAD, (i // cols) * tile_h + PAD
        grid.paste(_thumbnail(img, thumb), (x, y))
        for j, (text, colour) in enumerate(caption):
            draw.text((x, y + thumb + 1 + j * LINE), _fit(text, font, thumb), fill=colour, font=font)
    return grid


def _thumbnail(img: np.ndarray | None, side: int) -> Image.Image:
    tile = Image.new("RGB", (side, side), (200, 200, 200))
    if img is None:
        return tile
    pic = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
    scale = side / max(pic.size)
    pic = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))), Image.BILINEAR)
    tile.paste(pic, ((side - pic.width) // 2, (side - pic.height) // 2))
    return tile


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened in the middle to ``width`` pixels: names that share a prefix
    (``synthetic_grainy``, ``synthetic_speckled``, ``IMG_2024...``) still differ at their ends."""
    if font.getlength(text) <= width:
        return text
    head, tail = text[:len(text) // 2], text[len(text) // 2:]
    while (head or tail) and font.getlength(f"{head}…{tail}") > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return f"{head}…{tail}"


def _read(source: Any, row: int) -> np.ndarray | None:
    try:
        return source.read(row)
    except (RockclsError, OSError, ValueError):  # gone or broken since training read it: a grey tile
        return None


def log_gallery(run_id: str, source: Any, examples: Sequence[Example], *, key: str, step: int,
                table_file: str, image_file: str = "") -> None:
    """Read the examples' images from ``source`` (``read(row)``: RGB uint8), draw the grid and log
    it under ``key`` at ``step`` (and as ``image_file`` too, if given) with its table ``table_file``."""
    if not examples or tracking.has_image(run_id, key=key, step=step):  # none, or logged before a resume
        return
    grid = render([_read(source, e.row) for e in examples], [captions(e) for e in examples])
    tracking.log_image(run_id, grid, key=key, step=step)
    if image_file:
        tracking.log_image_file(run_id, grid, image_file)
    tracking.log_text(run_id, table(examples), table_file)
