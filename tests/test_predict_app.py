"""anomax-predict on a stand-in model: streaming in batches, unreadable files, refusals and exit status."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomax.apps.predict as predict
import anomax.data.images as images
from anomax.errors import DatasetError
from anomax.preprocess.params import create_dl_preprocess_param, crop_to_domain
from test_data_images import bomb_png


class StandInModel:
    """What predict needs of a model: batch_size and apply(images) -> result dicts."""

    def __init__(self, batch_size: int, preprocess=None):
        self.batch_size = batch_size
        self.preprocess = preprocess or create_dl_preprocess_param()
        self.calls: list[tuple[int, int]] = []  # (images in the call, images read so far)

    def set_params(self, batch_size):
        self.batch_size = batch_size

    def apply(self, batch):
        self.calls.append((len(batch), reads[0]))
        return [self._result(image) for image in batch]

    def _result(self, image):
        shape = crop_to_domain(self.preprocess, image).shape[:2]  # maps cover the domain
        return {"anomaly_image": np.full(shape, float(image.mean()), np.float32),
                "anomaly_score": float(image.mean()), "anomaly_class": "ok", "anomaly_class_id": 0,
                "anomaly_region": {"mask": np.zeros(shape, bool), "components": []}}


reads = [0]


@pytest.fixture(autouse=True)
def count_reads(monkeypatch):
    reads[0] = 0
    real = images.read_image

    def counted(path):
        reads[0] += 1
        return real(path)

    monkeypatch.setattr(images, "read_image", counted)


def folder_of_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        Image.fromarray(np.full((5, 7), 10 * number, np.uint8)).save(folder / f"{number:02d}.png")
    return folder


def test_inputs_are_streamed_in_batches(tmp_path):
    model = StandInModel(batch_size=3)
    paths = predict.image_paths(str(folder_of_images(tmp_path / "in", 7)))
    rows = predict.predict_files(model, paths, tmp_path / "out", overlays=False)
    assert [call[0] for call in model.calls] == [3, 3, 1]
    assert [call[1] for call in model.calls] == [3, 6, 7]  # each batch is scored before the next is read
    assert [row["anomaly_score"] for row in rows] == [10.0 * n for n in range(7)]


def test_overlays_draw_the_map_over_the_domain_it_covers(tmp_path, monkeypatch):
    import anomax.evaluation

    drawn = []
    monkeypatch.setattr(anomax.evaluation, "plot_anomaly_overlay",
                        lambda path, image, anomaly_image, **_: drawn.append((image.shape[:2], anomaly_image.shape)))
    model = StandInModel(batch_size=2, preprocess=create_dl_preprocess_param(
        width=4, height=4, domain_handling="crop_domain", domain=(1, 2, 3, 5)))
    predict.predict_files(model, predict.image_paths(str(folder_of_images(tmp_path / "in", 3))), tmp_path / "out")
    assert drawn == [((3, 4), (3, 4))] * 3  # rows 1-3, columns 2-5 of the 5 x 7 images


def test_an_image_the_model_refuses_gets_a_line_and_the_rest_are_scored(tmp_path):
    """One image smaller than the domain box ended the whole job without results."""
    from anomax.errors import InputError

    class Refusing(StandInModel):
        def apply(self, batch):
            if any(image.shape[0] < 5 for image in batch):
                raise InputError("preprocess 'domain' box lies outside the image")
            return super().apply(batch)

    folder = folder_of_images(tmp_path / "in", 4)
    Image.fromarray(np.zeros((3, 7), np.uint8)).save(folder / "01_small.png")
    rows = predict.predict_files(Refusing(batch_size=2), predict.image_paths(str(folder)), tmp_path / "out")
    assert [Path(row["image_file_name"]).name for row in rows if "error" in row] == ["01_small.png"]
    assert "domain" in next(row["error"] for row in rows if "error" in row)
    assert sum("anomaly_score" in row for row in rows) == 4
    assert (tmp_path / "out" / "results.csv").is_file()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_gets_a_line_and_the_rest_are_scored(tmp_path):
    folder = folder_of_images(tmp_path / "in", 3)
    bomb_png(folder / "00a_bomb.png")  # sorted second
    rows = predict.predict_files(StandInModel(2), predict.image_paths(str(folder)), tmp_path / "out",
                                 overlays=True)
    assert [("error" in row) for row in rows] == [False, True, False, False]
    assert "00a_bomb.png" in rows[1]["error"] and "ANOMAX_MAX_IMAGE_PIXELS" in rows[1]["error"]
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and "00a_bomb.png" in table[1]["error"] and table[0]["anomaly_score"] == "0.0"
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert all((tmp_path / "out" / row["overlay"]).is_file() for row in rows if "error" not in row)


def test_an_overlay_that_cannot_be_written_costs_only_its_picture(tmp_path, monkeypatch):
    """A name longer than the file system takes ended the whole job without results.csv."""
    from anomax.errors import OutputError

    folder = folder_of_images(tmp_path / "in", 2)
    long_stem = "ü" * 125  # 250 bytes: a name the file system takes, but not with the overlay's number before it
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(folder / f"{long_stem}.png")
    rows = predict.predict_files(StandInModel(2), predict.image_paths(str(folder)), tmp_path / "out")
    assert all("error" not in row and Path(row["overlay"]).is_file() for row in rows)
    assert len(Path(rows[2]["overlay"]).name.encode()) <= 255 and Path(rows[2]["overlay"]).name.startswith("00002_üü")
    real_draw = predict._draw

    def full_for_one(picture, row, *args, **kwargs):
        if row["image_file_name"].endswith("01.png"):
            raise OutputError(f"cannot write {picture}: No space left on device")
        return real_draw(picture, row, *args, **kwargs)

    monkeypatch.setattr(predict, "_draw", full_for_one)
    rows = predict.predict_files(StandInModel(2), predict.image_paths(str(folder)), tmp_path / "again")
    assert [row["error"][:40] for row in rows if "error" in row] == ["overlay not written: cannot write " +
                                                                     str(tmp_path)[:6]]
    assert all("anomaly_score" in row for row in rows) and (tmp_path / "again" / "results.csv").is_file()


def test_a_glob_matching_folders_reads_them_as_named_folders(tmp_path):
    folder_of_images(tmp_path / "lot1", 2)
    folder_of_images(tmp_path / "lot2" / "deeper", 1)
    (tmp_path / "other").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in predict.image_paths(str(tmp_path / "lot*"))] == \
        ["lot1/00.png", "lot1/01.png", "lot2/deeper/00.png"]


def test_nothing_scored_is_an_error(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "data.csv").write_text("1,2")
    with pytest.raises(DatasetError, match=r"none of the 2 input files could be scored.*results.csv"):
        predict.predict_files(StandInModel(2), predict.image_paths(str(folder)), tmp_path / "out", overlays=False)
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 3  # the reasons are written first


def test_dropped_alpha_and_broken_links_are_logged_once(tmp_path, caplog):
    folder = folder_of_images(tmp_path / "in", 2)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((5, 7, 4), np.uint8)).save(folder / f"{name}.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    images.log_conversions("earlier tests")
    with caplog.at_level("INFO", logger="anomax"):
        rows = predict.predict_files(StandInModel(2), predict.image_paths(str(folder)), tmp_path / "out",
                                     overlays=False)
    assert len(rows) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("2 images had an alpha channel" in m for m in messages) == 1
    assert sum("skipped 1 dangling symlink" in m for m in messages) == 1


def run_app(tmp_path, *overrides, run_dir: str = "run") -> subprocess.CompletedProcess:
    """anomax-predict in a fresh process (Hydra configures logging per process), with the stand-in model."""
    script = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import anomax.apps.predict as predict; "
              "from test_predict_app import StandInModel; "
              "predict.load_configured_model = lambda config: StandInModel(config['batch_size'] or 2); "
              "sys.argv[0] = 'anomax-predict'; predict.main()")
    return subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), "model_dir=unused",
                           f"hydra.run.dir={tmp_path / run_dir}", *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_app_refuses_batch_size_zero(tmp_path):
    done = run_app(tmp_path, f"inputs={folder_of_images(tmp_path / 'in', 1)}", "batch_size=0")
    assert done.returncode == 2 and "batch_size must be a positive integer, got 0" in done.stderr


def test_app_exits_non_zero_when_nothing_was_scored(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    done = run_app(tmp_path, f"inputs={tmp_path / 'in'}")
    assert done.returncode == 2 and "none of the 1 input files could be scored" in done.stderr
    done = run_app(tmp_path, f"inputs={folder_of_images(tmp_path / 'in', 2)}", run_dir="again")
    assert done.returncode == 0 and "2 images scored, 1 failed" in done.stdout


def test_app_refuses_a_used_directory_and_a_bad_colormap_before_scoring(tmp_path):
    inputs = f"inputs={folder_of_images(tmp_path / 'in', 1)}"
    assert run_app(tmp_path, inputs).returncode == 0
    again = run_app(tmp_path, inputs)  # the same run directory: refused, the first results kept
    assert again.returncode == 2 and "already holds" in again.stderr
    done = run_app(tmp_path, inputs, "colormap=foo", run_dir="colours")
    assert done.returncode == 2 and "colormap = 'foo' is invalid: it must be a matplotlib colormap name" in done.stderr
    assert not (tmp_path / "colours" / "results.csv").exists()


def test_app_refuses_a_key_it_does_not_take(tmp_path):
    done = run_app(tmp_path, f"inputs={folder_of_images(tmp_path / 'in', 1)}", "+colourmap=hot")
    assert done.returncode == 2 and "anomax-predict: error: unknown key(s) colourmap: not a setting" in done.stderr
    assert not (tmp_path / "run" / "results.csv").exists()


def test_a_folder_named_like_a_number_is_an_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder_of_images(tmp_path / "20240101", 2)
    assert [p.name for p in predict.image_paths(20240101)] == ["00.png", "01.png"]
    assert len(predict.image_paths([20240101, "20240101/00.png"])) == 3
    with pytest.raises(DatasetError, match="inputs are null"):
        predict.image_paths(None)
