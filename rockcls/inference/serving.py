"""What a served model accepts from a client, and what one request may cost the server.

A request is a DataFrame of ``image_b64`` (base64 image bytes) and/or ``img_path`` (files under a
configured image root) rows. Before anything is decoded, every row is checked against byte caps
(on the text as sent, before whitespace is stripped), its header against the pixel caps, and the
request against a row cap; a refused row gets its reason and never reaches the model. Decoding
big images draws on one pixel budget shared by every request of the process, so the memory that
decoding takes is bounded by that budget, not by the number of requests; and a request stops
working once the scoring server has given up on it (its timeout).

Settings come from the load-time ``model_config``, else the environment, else the defaults below
(sized for a server with a few GB of memory). docs/security.md lists what each guarantees.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rockcls.core.errors import DataError, RockclsError
from rockcls.data.images import decode_image, image_size, max_pixels_setting, read_under_root
from rockcls.inference.predictor import Predictor

log = logging.getLogger("rockcls")

PATH_COLUMN, B64_COLUMN = "img_path", "image_b64"
IMAGE_ROOT_ENV = "ROCKCLS_IMAGE_ROOT"
PATH_REFUSED = f"{PATH_COLUMN}: refused (not a readable image file under the served image root)"
PATH_DISABLED = (f"{PATH_COLUMN}: not accepted by this server (no image root is configured: "
                 f"{IMAGE_ROOT_ENV} or model_config image_root); send {B64_COLUMN}")
# The scoring server answers 504 after this many seconds (MLflow's own setting); work stops then too.
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
# Images up to this size decode without waiting for the budget: a 4000 x 4000 photo costs ~50 MB
# while decoding, and the scoring server runs at most a handful of requests at once.
SMALL_PIXELS = 16_000_000
_WHITESPACE = re.compile(r"\s+")
BUSY = ("server busy decoding other large images (ROCKCLS_DECODE_PIXELS, ROCKCLS_DECODE_WAIT): "
        "send this row again later")


@dataclass(frozen=True)
class ServeLimits:
    """Everything a served model enforces per image, per request and per process."""

    image_root: str = ""  # "" = no img_path rows at all
    max_image_bytes: int = 20 * 2**20  # encoded bytes of one image (file or decoded base64)
    max_request_bytes: int = 64 * 2**20  # encoded bytes of all images of one request
    max_rows: int = 1024  # rows of one request
    max_image_pixels: int = 100_000_000  # decoded pixels of one image (never above ROCKCLS_MAX_PIXELS)
    max_request_pixels: int = 200_000_000  # decoded pixels of all images of one request
    decode_pixels: int = 100_000_000  # pixels of big images being decoded at once, all requests together
    decode_wait: float = 0.0  # seconds a big image may wait for its share of decode_pixels (0: refuse at once)
    timeout: float = 60.0  # seconds a request may work (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)


# model_config key -> environment variable; the keys are logged with the model (MLflow accepts no other).
SETTINGS = {"image_root": IMAGE_ROOT_ENV, "max_image_bytes": "ROCKCLS_MAX_IMAGE_BYTES",
            "max_request_bytes": "ROCKCLS_MAX_REQUEST_BYTES", "max_rows": "ROCKCLS_MAX_ROWS",
            "max_image_pixels": "ROCKCLS_MAX_IMAGE_PIXELS", "max_request_pixels": "ROCKCLS_MAX_REQUEST_PIXELS",
            "decode_pixels": "ROCKCLS_DECODE_PIXELS", "decode_wait": "ROCKCLS_DECODE_WAIT", "timeout": TIMEOUT_ENV}
MODEL_CONFIG = {key: "" if key == "image_root" else 0 for key in SETTINGS}


def build_serve_limits(model_config: Mapping[str, Any] | None, env: Mapping[str, str] = os.environ) -> ServeLimits:
    """Limits from the load-time model_config, else the environment, else the defaults; a bad
    value stops the model from loading with one line naming the setting."""
    config, values = dict(model_config or {}), {}
    for f in fields(ServeLimits):
        given = config.get(f.name)
        raw, where = ((str(given).strip(), f"model_config {f.name}") if given not in (None, "", 0, "0")
                      else (env.get(SETTINGS[f.name], "").strip(), SETTINGS[f.name]))
        if not raw:
            continue
        if f.name == "image_root":
            real = os.path.realpath(raw)
            if not os.path.isdir(real):
                raise RockclsError(f"{where}: {raw!r} is not a folder")
            values[f.name] = real
            continue
        try:
            value = float(raw) if f.name in ("timeout", "decode_wait") else int(raw)
        except ValueError:
            value = 0
        if value < 0 or (value == 0 and f.name != "decode_wait"):
            raise RockclsError(f"{where}: expected a positive number, got {raw!r}")
        values[f.name] = value
    limits = ServeLimits(**values)
    cap = min(limits.max_image_pixels, max_pixels_setting())
    if limits.decode_pixels < cap:
        raise RockclsError(f"{SETTINGS['decode_pixels']}: {limits.decode_pixels} px cannot decode one image of "
                           f"the per-image cap ({cap} px); raise it or lower {SETTINGS['max_image_pixels']}")
    return limits


class RequestExpired(RockclsError):
    """The request's time is over: its client has had a 504; what is left is not computed."""


class PixelBudget:
    """Pixels that may be decoding at once in this process. A request waits for its share at most
    ``decode_wait`` seconds: a waiting request holds one of the scoring server's few threads, so
    long waits would let big images starve small ones."""

    def __init__(self, pixels: int):
        self.total = self.free = pixels
        self._cond = threading.Condition()

    def acquire(self, pixels: int, until: float) -> bool:
        """Take ``pixels``, waiting at most until the monotonic time ``until``; False if not taken."""
        with self._cond:
            while self.free < pixels:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.free -= pixels
            return True

    def release(self, pixels: int) -> None:
        with self._cond:
            self.free += pixels
            self._cond.notify_all()


class _BudgetedImages:
    """Rows of request bytes decoded one at a time: a big image holds its pixels of the budget
    until the next row is read (by then its decoded array has been resized and dropped), and no
    row is decoded after the deadline."""

    def __init__(self, payloads: list[bytes], pixels: list[int], budget: PixelBudget, deadline: float, wait: float):
        self.payloads, self.pixels, self.budget, self.deadline, self.wait = payloads, pixels, budget, deadline, wait
        self.held = 0

    def __len__(self) -> int:
        return len(self.payloads)

    def read(self, row: int) -> np.ndarray:
        self.close()
        if time.monotonic() > self.deadline:
            raise RequestExpired(f"request timed out after {row} of {len(self)} images")
        if self.pixels[row] > SMALL_PIXELS:
            if not self.budget.acquire(self.pixels[row], min(self.deadline, time.monotonic() + self.wait)):
                raise DataError(f"row {row}: {BUSY}")
            self.held = self.pixels[row]
        return decode_image(self.payloads[row], f"row {row}")

    def close(self) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0


def predict_request(predictor: Predictor, frame: pd.DataFrame, limits: ServeLimits, budget: PixelBudget, *,
                    tta: str, batch_size: int) -> pd.DataFrame:
    """``label``, ``prob_<class>`` and ``error`` for every row of ``frame``; refused rows are
    never decoded or predicted."""
    deadline = time.monotonic() + limits.timeout
    if len(frame) > limits.max_rows:
        raise RockclsError(f"request has {len(frame)} rows, limit {limits.max_rows} ({SETTINGS['max_rows']}): "
                           f"split it")
    payloads, errors = read_request_images(frame, limits)
    pixels = check_pixels(payloads, errors, limits)
    ok = [i for i, err in enumerate(errors) if not err]
    probs = np.full((len(frame), len(predictor.classes)), np.nan)
    labels = [""] * len(frame)
    if ok:
        source = _BudgetedImages([payloads[i] for i in ok], [pixels[i] for i in ok], budget, deadline,
                                 limits.decode_wait)
        try:
            pred = predictor.predict_source(source, tta=tta, batch_size=batch_size, num_workers=0)
        finally:
            source.close()
        for j, i in enumerate(ok):
            errors[i] = pred.errors[j]
        probs[ok] = pred.probs
        labels = [""] * len(frame)
        for j, i in enumerate(ok):
            labels[i] = pred.labels[j]
    bad = np.asarray([bool(e) for e in errors], dtype=bool)
    probs[bad] = np.nan
    out = pd.DataFrame({"label": [label if not err else "" for label, err in zip(labels, errors)]})
    for k, name in enumerate(predictor.classes):
        out[f"prob_{name}"] = probs[:, k]
    out["error"] = errors
    return out


def parse_batch_size(raw: Any) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise RockclsError(f"batch_size: expected an integer, got {raw!r}") from None
    if value < 1:
        raise RockclsError(f"batch_size: must be >= 1, got {value}")
    return value


def read_request_images(frame: pd.DataFrame, limits: ServeLimits) -> tuple[list[bytes], list[str]]:
    """The encoded image of every row (b"" for a refused one) and every row's reason ("" = fine).

    A bad row never fails the request: it gets its reason and the other rows are predicted.
    """
    if PATH_COLUMN not in frame.columns and B64_COLUMN not in frame.columns:
        raise RockclsError(f"model input needs a column {PATH_COLUMN!r} (image paths on the server) or "
                           f"{B64_COLUMN!r} (base64 image bytes); got columns {list(frame.columns)}")
    payloads, errors, used = [], [], 0
    for i in range(len(frame)):
        b64, path = _cell(frame, B64_COLUMN, i), _cell(frame, PATH_COLUMN, i)
        if b64:
            data, err = _decode_b64(b64, limits.max_image_bytes)
        elif path:
            data, err = _read_path(path, limits)
        else:
            data, err = b"", f"no image given (empty {PATH_COLUMN} and {B64_COLUMN})"
        if data and used + len(data) > limits.max_request_bytes:
            data, err = b"", _over_request_bytes(limits)
        used += len(data)
        payloads.append(data)
        errors.append(err)
    return payloads, errors


def _over_request_bytes(limits: ServeLimits) -> str:
    return (f"request over {limits.max_request_bytes} bytes of images ({SETTINGS['max_request_bytes']}): "
            f"send this row again in another request")


def check_pixels(payloads: list[bytes], errors: list[str], limits: ServeLimits) -> list[int]:
    """Every readable row's pixel count from its header (nothing decoded); rows over the per-image
    or the per-request pixel cap get their reason in ``errors``."""
    cap, used, pixels = min(limits.max_image_pixels, max_pixels_setting()), 0, [0] * len(payloads)
    for i, data in enumerate(payloads):
        if errors[i]:
            continue
        try:
            w, h = image_size(data, f"row {i}")
        except DataError as exc:
            errors[i] = str(exc).split(": ", 1)[-1]
            continue
        if w * h > cap:
            errors[i] = f"too large ({w}x{h} px, limit {cap} px per image; {SETTINGS['max_image_pixels']})"
        elif used + w * h > limits.max_request_pixels:
            errors[i] = (f"request over {limits.max_request_pixels} px of images ({SETTINGS['max_request_pixels']}): "
                         f"send this row again in another request")
        else:
            used += w * h
            pixels[i] = w * h
    return pixels


def _cell(frame: pd.DataFrame, column: str, i: int) -> str:
    if column not in frame.columns:
        return ""
    value = frame[column].iat[i]
    return value.strip() if isinstance(value, str) else ""


def _decode_b64(text: str, max_bytes: int) -> tuple[bytes, str]:
    """Base64 (optionally a ``data:...;base64,`` URL, line breaks allowed) -> (bytes, reason).

    The text's own length is checked first: base64 of ``max_bytes`` wrapped at 76 columns is at
    most ~1.37 x ``max_bytes`` characters, so nothing longer is copied or split."""
    too_big = f"{B64_COLUMN}: image over {max_bytes} bytes ({SETTINGS['max_image_bytes']})"
    if len(text) > (max_bytes + 2) // 3 * 4 * 78 // 76 + 256:
        return b"", too_big
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    payload = _WHITESPACE.sub("", payload)  # `base64` without -w0 wraps at 76 columns: layout, not data
    if len(payload) // 4 * 3 > max_bytes + 2:
        return b"", too_big
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return b"", f"{B64_COLUMN}: not valid base64"
    if len(data) > max_bytes:
        return b"", too_big
    return data, ""


def _read_path(path: str, limits: ServeLimits) -> tuple[bytes, str]:
    if not limits.image_root:
        return b"", PATH_DISABLED
    try:
        return read_under_root(path, limits.image_root, limits.max_image_bytes,
                               max_pixels=min(limits.max_image_pixels, max_pixels_setting())), ""
    except DataError as exc:
        log.debug("img_path row refused: %s", exc)  # the reason stays in the server's own log
        return b"", PATH_REFUSED
