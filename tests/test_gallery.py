"""Hard-example galleries: the fold run's highest-loss out-of-fold images, what the hard-negative
memory holds each epoch, and nothing at all with gallery_size 0."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from rockcls.core import gallery
from rockcls.core.errors import ConfigError
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config
from tests.test_train import fold_runs


def read_table(client: MlflowClient, run_id: str, path: str, tmp_path) -> list[dict]:
    text = open(client.download_artifacts(run_id, path, str(tmp_path))).read()
    return list(csv.DictReader(io.StringIO(text)))


def image_keys(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """key -> steps of the run's stepped images (MLflow 3 names them <key>+step+<n>+...)."""
    keys: dict[str, list[int]] = {}
    for a in client.list_artifacts(run_id, "images"):
        name = a.path.split("/", 1)[1]
        if name.endswith(".png"):
            key, _, step = name.split("+")[:3]
            keys.setdefault(key, []).append(int(step))
    return {k: sorted(v) for k, v in keys.items()}


def test_hardest_are_the_highest_losses_in_order():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95]]))
    labels = np.array([0, 0, 0, 1])
    examples = gallery.hardest(np.array([10, 11, 12, 13]), logits, labels, paths=[f"p{i}.png" for i in range(14)],
                               classes=["a", "b"], n=2)
    assert [e.row for e in examples] == [11, 12]
    assert (examples[0].label, examples[0].predicted, round(examples[0].prob, 2)) == ("a", "b", 0.8)
    assert examples[0].loss == pytest.approx(-np.log(0.2))
    rows = list(csv.DictReader(io.StringIO(gallery.table(examples))))
    assert [r["path"] for r in rows] == ["p11.png", "p12.png"] and rows[0]["predicted"] == "b"


def test_grid_has_one_captioned_thumbnail_per_image_and_a_grey_tile_for_an_unreadable_one():
    img = np.zeros((40, 20, 3), np.uint8)
    ex = gallery.Example(0, "/x/a_very_long_file_name_that_does_not_fit.png", "granite", "basalt", 0.9, 2.3)
    assert [text for text, _ in gallery.captions(ex)][1:3] == ["pred basalt", "p 0.90  loss 2.30"]
    grid = gallery.render([img] * 4 + [None], [gallery.captions(ex)] * 5)
    tile_w = gallery.THUMB + 2 * gallery.PAD
    tile_h = tile_w + 4 * gallery.LINE  # four caption lines
    assert grid.size == (3 * tile_w, 2 * tile_h)
    centre = gallery.PAD + gallery.THUMB // 2
    assert grid.getpixel((centre, centre)) == (0, 0, 0)  # the first image
    assert grid.getpixel((tile_w + centre, tile_h + centre)) == (200, 200, 200)  # the fifth: unreadable


def test_gallery_size_is_capped(tiny_cfg, synthetic_dir):
    with pytest.raises(ConfigError, match="gallery_size: must be <= 64"):
        tiny_cfg(synthetic_dir, gallery_size=65)


def test_fold_runs_log_their_hardest_oof_images_and_the_memory_each_epoch(two_fold_run, tmp_path):
    result = two_fold_run.result  # epochs 2, hn_ratio 0.25, gallery_size 5, gallery_every 1 (tests/conftest.py)
    client = MlflowClient(two_fold_run.uri)
    classes = result.classes
    for k, run in fold_runs(client, client.get_run(result.run_id)).items():
        run_id = run.info.run_id
        files = {a.path for a in client.list_artifacts(run_id, "hard_examples")}
        assert {"hard_examples/hardest_oof.png", "hard_examples/hardest_oof.csv", "hard_examples/hardest_val_epoch_0.csv",
                "hard_examples/hn_memory_epoch_1.csv"} <= files
        png = Image.open(client.download_artifacts(run_id, "hard_examples/hardest_oof.png", str(tmp_path)))
        assert png.width <= 8 * (gallery.THUMB + 2 * gallery.PAD)

        rows = read_table(client, run_id, "hard_examples/hardest_oof.csv", tmp_path)
        oof = np.load(client.download_artifacts(run_id, "oof_fold.npz", str(tmp_path)))
        losses = gallery.sample_losses(oof["logits"], result.labels[oof["rows"]])
        assert [float(r["loss"]) for r in rows] == pytest.approx(sorted(losses, reverse=True)[:5], abs=1e-4)
        assert all(r["label"] in classes and r["predicted"] in classes and 0 < float(r["prob"]) <= 1 for r in rows)

        assert image_keys(client, run_id) == {"hardest_oof": [run.data.metrics["kept_epoch"]], "hardest_val": [0, 1],
                                              "hn_memory": [0, 1]}
        size = {m.step: m.value for m in client.get_metric_history(run_id, "hn_memory_size")}
        counts = [client.get_metric_history(run_id, f"hn_memory.count.{c}") for c in classes]
        assert all(sorted(m.step for m in history) == [0, 1] for history in counts)
        assert {s: sum(m.value for h in counts for m in h if m.step == s) for s in size} == size
        memory = read_table(client, run_id, "hard_examples/hn_memory_epoch_1.csv", tmp_path)
        assert 0 < len(memory) <= 5 and [r["predicted"] for r in memory] == [""] * len(memory)
        assert [float(r["loss"]) for r in memory] == sorted((float(r["loss"]) for r in memory), reverse=True)


def test_gallery_size_zero_logs_no_image(mlflow_store, synthetic_dir):
    result = run_training(tiny_config(synthetic_dir, folds=1, epochs=1, hn_ratio=0.25, gallery_size=0, gallery_every=1))
    client = MlflowClient()
    (run,) = fold_runs(client, client.get_run(result.run_id)).values()
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not paths & {"images", "hard_examples"}
    assert {f"hn_memory.count.{c}" for c in result.classes} <= set(run.data.metrics)  # counts are cheap: kept


def test_only_the_process_that_owns_a_fold_run_logs_its_galleries(mlflow_store, synthetic_dir, tmp_path,
                                                                  devices_run):
    from tests.test_scale import finish, store_env, torchrun, train_args, train_runs

    out = finish(torchrun(train_args(synthetic_dir, gallery_size=4, gallery_every=1),
                          store_env(mlflow_store, tmp_path)), 240)
    (parent,) = train_runs(MlflowClient())
    assert parent.info.status == "FINISHED", out[-3000:]
    # devices_run: 2 epochs, devices cpu,cpu, hn_ratio 0.25, gallery_size 4, gallery_every 1 (tests/conftest.py)
    for client, parent_id in ((MlflowClient(), parent.info.run_id),
                              (MlflowClient(devices_run.uri), devices_run.result.run_id)):
        for run in fold_runs(client, client.get_run(parent_id)).values():
            keys = image_keys(client, run.info.run_id)  # once per step: rank 0 alone under torchrun
            assert keys == {"hardest_oof": [1], "hardest_val": [0, 1], "hn_memory": [0, 1]}
            assert len(read_table(client, run.info.run_id, "hard_examples/hardest_oof.csv", tmp_path)) == 4


def test_a_gallery_logged_again_at_the_same_step_is_not_logged_twice(mlflow_store):
    """What a fold resumed inside its last step does: the gallery it had logged stays the only one."""
    from rockcls.core import tracking

    class Source:
        def read(self, row):
            return np.full((20, 20, 3), 40 * row, dtype=np.uint8)

    run_id = tracking.start_run(experiment="gallery", name="g", kind="fold")
    examples = [gallery.Example(i, f"/x/{i}.png", "a", "b", 0.9, 2.0) for i in range(3)]
    for step in (0, 0, 1):
        gallery.log_gallery(run_id, Source(), examples, key="hardest_oof", step=step, table_file="t.csv")
    names = [p.rsplit("/", 1)[-1] for p in tracking.list_artifacts(run_id, "images")]
    steps = sorted(n.split("+")[2] for n in names if n.endswith(".png") and "compressed" not in n)
    assert steps == ["0", "1"], names
    tracking.end_run(run_id)
