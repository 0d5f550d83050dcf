"""Hostile names and folders: a file name that is not valid UTF-8 goes through every command (a valid
image with an odd name is predicted, never skipped), written by the one escaping rule
(`pipeline.core.paths.path_text`); and nothing under a data folder is dropped without a reason."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.app.batch_state import read_log
from pipeline.cli.main import main
from pipeline.core.paths import path_text, text_path
from pipeline.features.extract import extract
from pipeline.images.data import scan

from .conftest import TINY, make_folder, make_image

BAD = os.fsdecode(b"bad\xe9.jpg")  # a valid JPEG whose name is Latin-1, not UTF-8: must be predicted
BROKEN = os.fsdecode(b"broken\xff.jpg")  # not an image, and an odd name: skipped, listed escaped
BAD_TEXT, BROKEN_TEXT = "bad\\xe9.jpg", "broken\\xff.jpg"
NOT_AN_IMAGE = "not an image (unknown format)"


def _add_hostile(folder: Path, seed: int) -> tuple[Path, Path]:
    """The odd-named image in class0 and the odd-named broken file in class1 of `folder`."""
    bad, broken = folder / "class0" / BAD, folder / "class1" / BROKEN
    make_image(seed, tint=0).save(bad, format="JPEG", quality=90)
    broken.write_bytes(b"this is not an image")
    return bad, broken


def _csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:  # strict UTF-8: every written name is text
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_head")
    train = make_folder(root / "train", classes=2, per_class=5, start_seed=900)
    model = root / "lr.joblib"
    assert main(["fit", "--data", str(train), "--type", "logistic_regression", "--backbone", TINY,
                 "--cache", str(root / "cache"), "--out", str(model), "--quiet"]) == 0
    return model


# --------------------------------------------------------------------------- the escaping rule

def test_every_name_is_written_as_utf8_text_and_read_back_exactly():
    names = [bytes([b]) + b".jpg" for b in range(1, 256) if b != ord("/")]
    names += [b"bad\xe9.jpg", b"ok\xc3\xa9.jpg", b"\xff\xfe\x80", b"back\\slash", b"half\xe2\x82.jpg", b"a\nb"]
    for raw in names:
        name = os.fsdecode(raw)  # what os.listdir gives
        text = path_text(name)
        text.encode("utf-8")  # valid text, no surrogates left
        assert text == path_text(raw) == path_text(Path(name))
        assert text_path(text) == name
        try:
            assert text == raw.decode("utf-8")  # valid UTF-8 is written unchanged
        except UnicodeDecodeError:
            assert "\\x" in text
    assert path_text(os.fsdecode(b"dir/bad\xe9.jpg")) == "dir/bad\\xe9.jpg"


# --------------------------------------------------------------------------- the commands

def test_extract_keeps_an_odd_name_and_lists_a_broken_one_escaped(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    clean = extract(data, backbones=TINY, cache_dir=tmp_path / "clean", progress=False)
    bad, broken = _add_hostile(data, seed=50)
    cache = tmp_path / "cache"
    assert main(["extract", "--data", str(data), "--backbone", TINY, "--cache", str(cache), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {data / 'class1' / BROKEN_TEXT}: {NOT_AN_IMAGE}" in out
    assert f"full list, with reasons: {cache / 'skipped.csv'}" in out
    assert _csv(cache / "skipped.csv") == [{"path": str(data / "class1" / BROKEN_TEXT), "reason": NOT_AN_IMAGE}]

    report = extract(data, backbones=TINY, cache_dir=cache, progress=False)
    (odd,) = report.feature_sets.values()
    (before,) = clean.feature_sets.values()
    assert bad in odd.paths and broken not in odd.paths and report.computed == 0
    rows = [odd.paths.index(p) for p in before.paths]
    assert np.array_equal(odd.features.compute()[rows], before.features.compute())  # bit-identical


def test_predict_and_evaluate_predict_the_odd_name(tmp_path, head, capsys):
    data = make_folder(tmp_path / "new", classes=2, per_class=3, start_seed=300)
    cache = ["--cache", str(tmp_path / "cache"), "--quiet"]
    assert main(["predict", "--model", str(head), "--data", str(data), "--out", str(tmp_path / "clean.csv"),
                 *cache]) == 0
    clean = _csv(tmp_path / "clean.csv")
    bad, _ = _add_hostile(data, seed=60)
    capsys.readouterr()
    assert main(["predict", "--model", str(head), "--data", str(data), "--out", str(tmp_path / "odd.csv"),
                 *cache]) == 0
    out = capsys.readouterr().out
    assert f"skipped {data / 'class1' / BROKEN_TEXT}: {NOT_AN_IMAGE}" in out
    assert f"full list, with reasons: {tmp_path / 'odd.skipped.csv'}" in out and "7 predictions written" in out
    rows = _csv(tmp_path / "odd.csv")
    assert len(rows) == 7 and all(row in rows for row in clean)  # the good files' rows bit-identical
    (odd_row,) = [row for row in rows if row not in clean]
    assert odd_row["path"] == str(data / "class0" / BAD_TEXT) and Path(text_path(odd_row["path"])) == bad
    assert odd_row["predicted_class"] in ("class0", "class1")
    assert _csv(tmp_path / "odd.skipped.csv") == [{"path": str(data / "class1" / BROKEN_TEXT),
                                                   "reason": NOT_AN_IMAGE}]
    assert _csv(tmp_path / "clean.skipped.csv") == []  # written every time: never an earlier run's list

    assert main(["evaluate", "--model", str(head), "--data", str(data), *cache]) == 0
    out = capsys.readouterr().out
    assert f"skipped {data / 'class1' / BROKEN_TEXT}: {NOT_AN_IMAGE}" in out and "(7 images)" in out


def test_a_list_file_may_name_files_that_are_not_utf8(tmp_path, head, capsys):
    folder = tmp_path / "uploads"
    folder.mkdir()
    make_image(70).save(folder / BAD, format="JPEG")
    listing = tmp_path / "queue.txt"
    listing.write_bytes(b"uploads/bad\xe9.jpg\nuploads/missing\xff.jpg\n")  # as `find` writes them
    out_csv = tmp_path / "out.csv"
    assert main(["predict", "--model", str(head), "--data", str(listing), "--out", str(out_csv),
                 "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    assert [row["path"] for row in _csv(out_csv)] == [str(folder / BAD_TEXT)]
    assert _csv(tmp_path / "out.skipped.csv") == [{"path": str(folder / "missing\\xff.jpg"),
                                                   "reason": "file not found"}]


def _run_config(path: Path, train: Path, test: Path, out: Path, cache: Path) -> Path:
    path.write_text(f"data: {{train: '{train}', test: '{test}'}}\n"
                    f"features: {{backbones: [{TINY}], cache_dir: '{cache}'}}\n"
                    "heads:\n  - {name: logreg, type: logistic_regression, C: 1.0}\n"
                    f"output_dir: '{out}'\n")
    return path


def test_run_predicts_the_odd_test_image_and_writes_its_skip_list(tmp_path, capsys):
    train = make_folder(tmp_path / "train", classes=2, per_class=5)
    test = make_folder(tmp_path / "test", classes=2, per_class=3, start_seed=100)
    cache = tmp_path / "cache"
    clean_out, odd_out = tmp_path / "clean", tmp_path / "odd"
    assert main(["run", str(_run_config(tmp_path / "clean.yaml", train, test, clean_out, cache)), "--quiet"]) == 0
    assert "skipped" not in capsys.readouterr().out
    bad, _ = _add_hostile(test, seed=110)
    assert main(["run", str(_run_config(tmp_path / "odd.yaml", train, test, odd_out, cache)), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {test / 'class1' / BROKEN_TEXT}: {NOT_AN_IMAGE}" in out
    assert f"full list, with reasons: {odd_out / 'skipped.csv'}" in out
    assert _csv(odd_out / "skipped.csv") == [{"path": str(test / "class1" / BROKEN_TEXT), "reason": NOT_AN_IMAGE}]
    assert _csv(clean_out / "skipped.csv") == []

    clean, odd = _csv(clean_out / "predictions.csv"), _csv(odd_out / "predictions.csv")
    assert len(odd) == len(clean) + 1 and all(row in odd for row in clean)  # good rows bit-identical
    (odd_row,) = [row for row in odd if row not in clean]
    assert odd_row["path"] == str(test / "class0" / BAD_TEXT) and Path(text_path(odd_row["path"])) == bad
    metrics = json.loads((odd_out / "metrics.json").read_text())
    assert metrics["extract"]["skipped"] == 1 and metrics["extract"]["images"] == 10 + 8
    (odd_out / "report.html").read_text(encoding="utf-8")


def test_class_folders_whose_names_are_not_utf8_are_classes_named_by_the_rule(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=3, start_seed=150)
    os.rename(data / "class1", data / os.fsdecode(b"caf\xe9"))
    model = tmp_path / "head.joblib"
    assert main(["fit", "--data", str(data), "--type", "knn", "--backbone", TINY, "--cache", str(tmp_path / "c"),
                 "--out", str(model), "--quiet"]) == 0
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.csv"),
                 "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    rows = _csv(tmp_path / "p.csv")
    assert "p_caf\\xe9" in rows[0] and {row["predicted_class"] for row in rows} == {"class0", "caf\\xe9"}
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--cache", str(tmp_path / "c"),
                 "--quiet"]) == 0


def _batch_config(path: Path, inputs: list[str], head: Path, out: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inputs": inputs, "heads": {"lr": str(head)},
                                "features": {"cache_dir": str(out / "cache")},
                                "output_dir": str(out / "predictions"), "log": str(out / "runs.jsonl")}))
    return path


def _batch_rows(out: Path) -> list[dict]:
    return [row for path in sorted((out / "predictions").glob("*/run-*.csv")) for row in _csv(path)]


def test_batch_predicts_the_odd_name_and_the_next_run_does_not_fail(tmp_path, head, capsys):
    incoming = make_folder(tmp_path / "incoming", classes=2, per_class=3, start_seed=400)
    configs = tmp_path / "configs"  # inputs relative to the config: configs/../incoming
    clean_out, odd_out = tmp_path / "clean", tmp_path / "odd"
    assert main(["batch", str(_batch_config(configs / "clean.yaml", ["../incoming"], head, clean_out)),
                 "--quiet"]) == 0
    bad, broken = _add_hostile(incoming, seed=410)
    odd = _batch_config(configs / "odd.yaml", ["../incoming"], head, odd_out)
    capsys.readouterr()
    assert main(["batch", str(odd), "--quiet"]) == 3  # partial: the broken file, newly skipped
    out = capsys.readouterr().out
    assert f"skipped {incoming / 'class1' / BROKEN_TEXT}: {NOT_AN_IMAGE}" in out
    assert f"full list, with reasons: {odd_out / 'predictions' / 'skipped.json'}" in out
    assert main(["batch", str(odd), "--quiet"]) == 0  # the same files again: nothing new, nothing fails
    assert "1 files skipped as in earlier runs" in capsys.readouterr().out

    def keyed(rows):
        return {row["path"]: {k: v for k, v in row.items() if k != "run_id"} for row in rows}

    clean, odd_rows = keyed(_batch_rows(clean_out)), keyed(_batch_rows(odd_out))
    assert len(odd_rows) == len(clean) + 1 and all(odd_rows[p] == row for p, row in clean.items())
    assert str(incoming / "class0" / BAD_TEXT) in odd_rows  # predicted, not skipped
    for path in odd_rows:  # absolute and normalised: no configs/../
        assert path.startswith(f"{incoming}/") and "/../" not in path and Path(text_path(path)).is_file()

    record = json.loads((odd_out / "predictions" / "skipped.json").read_text())
    assert list(record) == [str(broken)]  # the exact name, to find the file again on the next run
    first, second = read_log(odd_out / "runs.jsonl")
    assert first["new_skipped_files"] == [{"path": str(incoming / "class1" / BROKEN_TEXT), "reason": NOT_AN_IMAGE}]
    assert (second["status"], second["new_skipped"], second["predicted"]) == ("ok", 0, 0)
    assert bad.is_file()


def test_a_symlinked_batch_input_keeps_its_name(tmp_path, head):
    real = make_folder(tmp_path / "real", classes=1, per_class=2, start_seed=450)
    (tmp_path / "linked").symlink_to(real)
    out = tmp_path / "out"
    assert main(["batch", str(_batch_config(tmp_path / "c.yaml", ["linked"], head, out)), "--quiet"]) == 0
    assert sorted(row["path"] for row in _batch_rows(out)) == [str(tmp_path / "linked" / "class0" / f"img{i}.jpg")
                                                              for i in range(2)]


# --------------------------------------------------------------------------- nothing dropped silently

def test_links_that_lead_nowhere_or_round_in_a_loop_are_skipped_with_reasons(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=2, start_seed=500)
    other = make_folder(tmp_path / "other", classes=1, per_class=1, start_seed=510)
    folder = data / "class0"
    (folder / "loop-a").symlink_to("loop-b")
    (folder / "loop-b").symlink_to("loop-a")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")  # a link back to a folder that contains it
    (folder / "more").symlink_to(other / "class0")  # a link to a folder elsewhere: followed
    os.mkfifo(folder / "pipe")  # would block a reader forever
    (data / "gone-class").symlink_to(tmp_path / "nowhere")
    dataset = scan(data)
    reasons = {Path(p).relative_to(data).as_posix(): reason for p, reason in dataset.skipped}
    broken = "broken symbolic link (its target does not exist)"
    assert reasons == {"class0/loop-a": "symbolic link loop", "class0/loop-b": "symbolic link loop",
                       "class0/dangling.jpg": broken, "gone-class": broken,
                       "class0/pipe": "not a regular file (a named pipe)",
                       "class0/sub/up": "symbolic link loop (leads back to a folder that contains it)"}
    assert folder / "more" / "img0.jpg" in dataset.paths and len(dataset.paths) == 5

    cache = tmp_path / "cache"
    assert main(["extract", "--data", str(data), "--backbone", TINY, "--cache", str(cache), "--quiet"]) == 0
    listed = {Path(row["path"]).relative_to(data).as_posix(): row["reason"] for row in _csv(cache / "skipped.csv")}
    assert listed == reasons


def test_an_unreadable_folder_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """Injected, so that it holds where the tests run as root (whom chmod 000 does not stop)."""
    data = make_folder(tmp_path / "data", classes=2, per_class=2, start_seed=520)
    locked = data / "class0" / "locked"
    locked.mkdir()
    make_image(530).save(locked / "hidden-from-us.jpg")
    scandir = os.scandir

    def refusing(path):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    assert scan(data).skipped == [(str(locked), "unreadable folder: Permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder anyway; "
                                              "test_an_unreadable_folder_is_skipped_with_its_reason injects it")
def test_a_chmod_000_folder_is_skipped_with_its_reason(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=2, start_seed=540)
    locked = data / "class1" / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        assert scan(data).skipped == [(str(locked), "unreadable folder: Permission denied")]
    finally:
        locked.chmod(0o755)


def test_an_empty_class_folder_warns_for_extract_and_fit_and_stops_a_run(tmp_path, capsys):
    train = make_folder(tmp_path / "train", classes=2, per_class=4, start_seed=600)
    (train / "empty").mkdir()
    cache = ["--cache", str(tmp_path / "cache"), "--quiet"]
    warning = f"warning: {train}: class folder with no images: empty (a head fitted on this data never predicts it)"
    assert main(["extract", "--data", str(train), "--backbone", TINY, *cache]) == 0
    assert warning in capsys.readouterr().err
    assert main(["fit", "--data", str(train), "--type", "logistic_regression", "--backbone", TINY,
                 "--out", str(tmp_path / "h.joblib"), *cache]) == 0
    assert warning in capsys.readouterr().err

    test = make_folder(tmp_path / "test", classes=2, per_class=2, start_seed=700)
    config = _run_config(tmp_path / "run.yaml", train, test, tmp_path / "out", tmp_path / "cache")
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"'data.train': class folder with no images: {train / 'empty'} (a run needs images in every" in err
    assert err.startswith(f"error: {config}:1:") and not (tmp_path / "out").exists()


def test_class_folders_named_like_splits_warn(tmp_path, capsys):
    root = tmp_path / "dataset"  # --data given the folder that holds the splits
    make_folder(root / "train", classes=2, per_class=3, start_seed=800)
    make_folder(root / "val", classes=2, per_class=2, start_seed=810)
    assert main(["fit", "--data", str(root), "--type", "knn", "--backbone", TINY, "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "h.joblib"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {root}: class folders named like splits (train, val): if they are splits, give one of them "
            f"({root / 'train'}), not the folder that holds them") in err


def test_many_skips_are_summarised_the_same_way_by_every_command(tmp_path, head, capsys):
    data = tmp_path / "flood"
    data.mkdir()
    make_image(850).save(data / "good.jpg")
    for i in range(25):
        (data / f"bad{i:02d}.jpg").write_bytes(b"not an image %d" % i)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"flood/missing{i}.jpg\n" for i in range(30)) + "flood/good.jpg\n")
    cache = ["--cache", str(tmp_path / "cache"), "--quiet"]
    for command, data_arg, listed in (("extract", data, tmp_path / "cache" / "skipped.csv"),
                                      ("predict", listing, tmp_path / "predictions.skipped.csv")):
        args = ["--backbone", TINY] if command == "extract" else ["--model", str(head), "--out",
                                                                   str(tmp_path / "predictions.csv")]
        assert main([command, "--data", str(data_arg), *args, *cache]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("skipped ", "... ",
                                                                                            "full list"))]
        count = 25 if command == "extract" else 30
        assert len(lines) == 12 and lines[10] == f"... and {count - 10} more"
        assert lines[11] == f"full list, with reasons: {listed}" and len(_csv(listed)) == count
    shutil.rmtree(tmp_path / "cache")
