"""What one request may cost a served model, and confinement without races (no model trained here:
the pyfunc-level checks are in tests/test_registry.py, the real server in tests/test_serve.py)."""

from __future__ import annotations

import base64
import os
import threading
import time
import tracemalloc

import cv2
import numpy as np
import pandas as pd
import pytest

from rockcls.core.errors import DataError, RockclsError
from rockcls.data import images
from tests.hostile import png_header_only
from rockcls.inference import serving
from rockcls.inference.predictor import Prediction


def png(h: int = 16, w: int = 16, value: int = 0) -> bytes:
    return cv2.imencode(".png", np.full((h, w, 3), value, dtype=np.uint8))[1].tobytes()


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch) -> str:
    """Both ways of opening beneath the root: the kernel's openat2, and the component walk kept
    for kernels without it."""
    monkeypatch.setattr(images, "_openat2_works", None if request.param == "openat2" else False)
    return request.param


def test_a_folder_swapped_for_a_symlink_while_reading_never_yields_a_file_outside_the_root(tmp_path, resolver):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    inside, secret = png(value=1), png(value=2)  # the secret: other bytes, same name
    (outside / "x.png").write_bytes(secret)
    (root / "sub").mkdir()
    (root / "sub" / "x.png").write_bytes(inside)
    (root / "link").symlink_to(outside)
    stop, swaps = threading.Event(), [0]

    def swapper():  # "sub" is the folder, then a link to the folder outside, then the folder again ...
        while not stop.is_set():
            os.rename(root / "sub", root / "held")
            os.rename(root / "link", root / "sub")
            os.rename(root / "sub", root / "link")
            os.rename(root / "held", root / "sub")
            swaps[0] += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    got = {"inside": 0, "outside": 0, "refused": 0}
    try:
        for _ in range(3000):
            try:
                data = images.read_under_root("sub/x.png", str(root.resolve()), 1 << 20)
            except DataError:
                got["refused"] += 1
                continue
            got["outside" if data == secret else "inside"] += 1
    finally:
        stop.set()
        thread.join()
    assert swaps[0] > 50 and got["refused"] > 0 and got["inside"] > 0, got
    assert got["outside"] == 0, got
    assert images._openat2_works is (resolver == "openat2")


def test_paths_beneath_the_root_open_and_everything_else_is_refused(tmp_path, resolver):
    root = (tmp_path / "root").resolve()
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png())
    (tmp_path / "out.png").write_bytes(png())
    (root / "inner.png").symlink_to(root / "sub" / "a.png")  # a link that stays inside: refused too
    for ok in ("sub/a.png", str(root / "sub" / "a.png"), "sub/../sub/a.png", "./sub//a.png"):
        assert images.read_under_root(ok, str(root), 1 << 20) == png()
    for bad, why in (("../out.png", "outside"), (str(tmp_path / "out.png"), "outside"), ("/etc/passwd", "outside"),
                     ("inner.png", "unreadable"), ("sub", "not a regular file"), ("a\0b", "not a valid path"),
                     ("", "outside"), ("sub/missing.png", "No such file")):
        with pytest.raises(DataError, match=why):
            images.read_under_root(bad, str(root), 1 << 20)


def test_a_huge_sparse_file_is_refused_from_its_size_and_header_without_being_read(tmp_path, monkeypatch):
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "10000000")
    plain = tmp_path / "plain.png"
    with open(plain, "wb") as f:  # 3 GiB of nothing, no disk used
        f.truncate(3 * 2**30)
    headed = tmp_path / "headed.png"
    with open(headed, "wb") as f:  # a 100x100 PNG header, then 40 MiB: no 100x100 image is that big
        f.write(png_header_only(100, 100))
        f.truncate(40 * 2**20)
    bomb = tmp_path / "bomb.png"
    with open(bomb, "wb") as f:
        f.write(png_header_only(5000, 5000))
        f.truncate(40 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"plain.png: too large \(3221225472 bytes: more than any image of "
                                            r"10000000 px can take"):
            images.load_image(str(plain))
        with pytest.raises(DataError, match=r"headed.png: too large \(41943040 bytes for a 100x100 image\)"):
            images.load_image(str(headed))
        with pytest.raises(DataError, match=r"bomb.png: too large \(5000x5000 px, limit 10000000 px"):
            images.load_image(str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # the header was read, not the file


def test_spaces_in_base64_are_refused_from_the_text_length_before_any_copy():
    text = "AB " * (5 * 2**20)  # 15 MB of text; without the spaces still 10 MB
    tracemalloc.start()
    try:
        data, err = serving._decode_b64(text, 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == b"" and err == "image_b64: image over 1048576 bytes (ROCKCLS_MAX_IMAGE_BYTES)"
    assert peak < 2**20
    wrapped = base64.encodebytes(png(64, 64)).decode("ascii")  # line breaks every 76 columns pass
    assert serving._decode_b64(wrapped, len(png(64, 64)))[0] == png(64, 64)


def test_the_pixel_budget_is_shared_and_a_wait_ends_in_time():
    budget = serving.PixelBudget(100)
    assert budget.acquire(80, time.monotonic() + 1)
    start = time.monotonic()
    assert not budget.acquire(30, time.monotonic() + 0.2)
    assert 0.15 < time.monotonic() - start < 2
    threading.Timer(0.1, budget.release, args=(80,)).start()
    assert budget.acquire(30, time.monotonic() + 5)  # woken by the release
    assert budget.free == 70


def test_a_big_image_that_finds_the_budget_taken_is_refused_at_once_and_the_rest_is_predicted(monkeypatch):
    """While another request decodes a big image, this one's big row gets a retry reason after
    ROCKCLS_DECODE_WAIT instead of holding one of the server's threads; its small rows go on."""
    monkeypatch.setattr(serving, "SMALL_PIXELS", 100)
    budget = serving.PixelBudget(64 * 64)
    assert budget.acquire(64 * 64, time.monotonic() + 1)  # another request's image
    frame = pd.DataFrame({"image_b64": [b64(png(64, 64)), b64(png(8, 8))]})
    start = time.monotonic()
    out = serving.predict_request(Recorder(), frame, serving.ServeLimits(decode_pixels=64 * 64, decode_wait=0.2),
                                  budget, tta="none", batch_size=8)
    assert 0.15 < time.monotonic() - start < 3
    assert list(out["error"]) == [serving.BUSY, ""] and list(out["label"]) == ["", "a"]


class Recorder:
    """A stand-in predictor that records which rows reach the model and how the budget stands."""

    classes = ["a", "b"]

    def __init__(self, budget=None):
        self.seen, self.budget, self.held = [], budget, []

    def predict_source(self, source, **_):
        rows, errors = [], []
        for i in range(len(source)):  # as the real predictor reads: a DataError is that row's reason
            try:
                rows.append(source.read(i))
                errors.append("")
            except DataError as exc:
                rows.append(None)
                errors.append(str(exc).split(": ", 1)[-1])
        self.held.append(self.budget.free if self.budget else None)
        self.seen.append([r.shape for r in rows if r is not None])
        logits = np.zeros((len(rows), 2), dtype=np.float32)
        return Prediction(logits, self.classes, errors)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_refused_rows_never_reach_the_model_and_pixel_caps_apply_per_image_and_per_request():
    limits = serving.ServeLimits(max_image_pixels=64 * 64, max_request_pixels=2 * 32 * 32, decode_pixels=64 * 64)
    model = Recorder()
    frame = pd.DataFrame({"image_b64": [b64(png(32, 32)), "%%%", b64(png(100, 100)), b64(png(32, 32)),
                                        b64(png(32, 32)), b64(png_header_only(40000, 40000))]})
    out = serving.predict_request(model, frame, limits, serving.PixelBudget(limits.decode_pixels), tta="none",
                                  batch_size=8)
    assert model.seen == [[(32, 32, 3), (32, 32, 3)]]  # rows 0 and 3 only
    errors = list(out["error"])
    assert errors[0] == errors[3] == "" and errors[1] == "image_b64: not valid base64"
    assert errors[2] == "too large (100x100 px, limit 4096 px per image; ROCKCLS_MAX_IMAGE_PIXELS)"
    assert errors[4].startswith("request over 2048 px of images (ROCKCLS_MAX_REQUEST_PIXELS)")
    assert errors[5].startswith("too large (over ")  # Pillow refuses the header itself
    assert list(out["label"]) == ["a", "", "", "a", "", ""] and out.iloc[[1, 2, 4, 5], 1:3].isna().all().all()

    many = pd.DataFrame({"image_b64": ["%%%"] * 11})
    with pytest.raises(RockclsError, match="request has 11 rows, limit 10 \\(ROCKCLS_MAX_ROWS\\): split it"):
        serving.predict_request(model, many, serving.ServeLimits(max_rows=10), serving.PixelBudget(10**8),
                                tta="none", batch_size=8)
    invalid = serving.predict_request(Recorder(), pd.DataFrame({"image_b64": ["%%%"] * 1000}), serving.ServeLimits(),
                                      serving.PixelBudget(10**8), tta="none", batch_size=8)
    assert (invalid["error"] == "image_b64: not valid base64").all()


def test_big_images_hold_the_shared_budget_while_decoding_and_give_it_back(monkeypatch):
    monkeypatch.setattr(serving, "SMALL_PIXELS", 100)
    budget = serving.PixelBudget(64 * 64)
    model = Recorder(budget)
    frame = pd.DataFrame({"image_b64": [b64(png(8, 8)), b64(png(64, 64))]})
    serving.predict_request(model, frame, serving.ServeLimits(decode_pixels=64 * 64), budget, tta="none", batch_size=8)
    assert model.held == [0]  # the 64x64 image held all of it while it was in use ...
    assert budget.free == 64 * 64  # ... and gave it back at the end


def test_a_request_stops_working_once_its_time_is_over(monkeypatch):
    clock = iter(np.arange(0, 100, 1.0))
    monkeypatch.setattr(serving.time, "monotonic", lambda: next(clock))
    frame = pd.DataFrame({"image_b64": [b64(png())] * 10})
    with pytest.raises(serving.RequestExpired, match="request timed out after 3 of 10 images"):
        serving.predict_request(Recorder(), frame, serving.ServeLimits(timeout=3), serving.PixelBudget(10**8),
                                tta="none", batch_size=8)


def test_serve_limits_come_from_model_config_then_environment_and_bad_values_are_one_line(tmp_path):
    env = {"ROCKCLS_MAX_ROWS": "7", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "30", "ROCKCLS_DECODE_PIXELS": "300000000"}
    limits = serving.build_serve_limits({"max_rows": 5, "image_root": str(tmp_path)}, env)
    assert (limits.max_rows, limits.timeout, limits.decode_pixels, limits.image_root) == (5, 30.0, 300_000_000,
                                                                                          str(tmp_path.resolve()))
    with pytest.raises(RockclsError, match="^ROCKCLS_MAX_REQUEST_PIXELS: expected a positive number, got 'lots'$"):
        serving.build_serve_limits({}, {"ROCKCLS_MAX_REQUEST_PIXELS": "lots"})
    with pytest.raises(RockclsError, match="ROCKCLS_DECODE_PIXELS: 1000 px cannot decode one image"):
        serving.build_serve_limits({"decode_pixels": 1000}, {})
    assert set(serving.MODEL_CONFIG) == set(serving.SETTINGS)
