"""`mlflow models serve -m models:/NAME@champion --env-manager local` answers real HTTP requests."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from rockcls.core import tracking
from rockcls.core.processes import stop_process_group
from tests.hostile import EPS_BYTES, png_header_only
from rockcls.inference import serving
from rockcls.runs import ensemble, registry
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config

NAME = "rockcls-serve"
BIN = Path(sys.executable).parent




@pytest.fixture(scope="module")
def champion(store, synthetic_dir) -> str:
    run = run_training(tiny_config(synthetic_dir, epochs=1))
    fit = ensemble.fit_ensemble(ensemble.load_members([run.run_id]))
    run_id = ensemble.log_ensemble(fit, experiment="rockcls")
    reg = registry.register_ensemble(fit, name=NAME, run_id=run_id, tta="flip")
    tracking.end_run(run_id)
    assert reg.champion
    return f"models:/{NAME}@champion"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(champion, store, synthetic_dir):
    """The scoring server in its own process group; always stopped, even when a test fails."""
    port = _free_port()
    log = open(store / "serve.log", "w")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           serving.IMAGE_ROOT_ENV: str(synthetic_dir)}  # img_path is refused without a root
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", champion, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            cwd=store, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = (store / "serve.log").read_text()[-3000:]
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{tail}")
            try:
                if _get(f"{url}/ping") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer in 120 s:\n{(store / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


def test_serve_answers_paths_and_base64_like_the_loaded_model(server, champion, synthetic_dir) -> None:
    images = [str(p) for p in sorted(synthetic_dir.rglob("*.png"))[::20]]
    encoded = base64.b64encode(Path(images[0]).read_bytes()).decode("ascii")
    rows = [[p, None] for p in images] + [[None, encoded]]
    status, body = _post(f"{server}/invocations",
                         {"dataframe_split": {"columns": ["img_path", "image_b64"], "data": rows}})
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    local = mlflow.pyfunc.load_model(champion, model_config={"image_root": str(synthetic_dir)}).predict(
        pd.DataFrame({"img_path": images}))
    assert list(served["label"][:-1]) == list(local["label"])
    prob_cols = [c for c in local.columns if c.startswith("prob_")]
    pd.testing.assert_frame_equal(served[prob_cols][:-1], local[prob_cols], atol=1e-6)
    assert served.iloc[-1].to_dict() == served.iloc[0].to_dict()  # the same image sent as base64
    assert (served["error"] == "").all()


def test_serve_accepts_records_with_params(server) -> None:
    pixel = base64.b64encode(Path(__file__).read_bytes()).decode("ascii")  # not an image
    status, body = _post(f"{server}/invocations",
                         {"dataframe_records": [{"image_b64": pixel}], "params": {"tta": "d4"}})
    assert status == 200
    assert body["predictions"][0]["label"] == "" and "not a decodable image" in body["predictions"][0]["error"]


def test_serve_rejects_requests_without_an_image_column(server) -> None:
    status, body = _post(f"{server}/invocations", {"dataframe_split": {"columns": ["path"], "data": [["x.png"]]}})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "model input needs a column 'img_path'" in body["message"]


def test_serve_answers_bad_rows_with_their_reason_and_never_a_traceback(server, synthetic_dir) -> None:
    image = sorted(synthetic_dir.rglob("*.png"))[0].read_bytes()
    wrapped = base64.encodebytes(image).decode("ascii")
    rows = [[None, wrapped], [None, base64.b64encode(png_header_only(40000, 40000)).decode("ascii")],
            [None, base64.b64encode(EPS_BYTES).decode("ascii")], ["/etc/passwd", None], ["../../x.png", None]]
    status, body = _post(f"{server}/invocations",
                         {"dataframe_split": {"columns": ["img_path", "image_b64"], "data": rows}})
    assert status == 200, body
    out = pd.DataFrame(body["predictions"])
    assert out["error"].iloc[0] == "" and out["label"].iloc[0] != ""
    assert out["error"].iloc[1].startswith("too large") and out["error"].iloc[2].startswith("not a decodable image")
    assert list(out["error"].iloc[3:]) == [serving.PATH_REFUSED] * 2
    status, body = _post(f"{server}/invocations", {"dataframe_split": {"columns": ["image_b64"], "data": [[wrapped]]},
                                                   "params": {"batch_size": -1}})
    assert status == 400 and "batch_size: must be >= 1, got -1" in body["message"]
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
