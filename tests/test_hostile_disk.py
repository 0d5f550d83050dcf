"""A hostile disk: tampered cache records and meta.json, a full disk (injected ENOSPC, and a real 200 KB
tmpfs when the tests run as root), a read-only cache folder. Every failure is one line naming the path,
and leaves the previous outputs as they were and no part of a new one."""

import errno
import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import pipeline.app.batch_state as batch_state
import pipeline.core.io as core_io
from pipeline.app.batch_state import read_log
from pipeline.cli.main import main
from pipeline.core.errors import OutputError
from pipeline.core.io import write_json_atomic
from pipeline.features.cache import FeatureStore
from pipeline.features.extract import extract
from pipeline.heads.decision import DecisionRule
from pipeline.heads.predict import write_predictions

from .conftest import TINY, make_folder

NO_SPACE = os.strerror(errno.ENOSPC)


def _extract(folder, cache_dir, **options):
    report = extract(folder, TINY, cache_dir=cache_dir, progress=False, **options)
    (fs,) = report.feature_sets.values()
    return report, FeatureStore(cache_dir / fs.cache_key), fs.features.compute()


def _cli_extract(folder, cache_dir, *extra):
    return main(["extract", "--data", str(folder), "--backbone", TINY, "--cache", str(cache_dir), "--quiet", *extra])


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files of interrupted writes: none may stay behind after a failure."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- cache records and meta.json

def test_reversed_image_ids_fail_verify_and_are_computed_again(tiny_folder, cache_dir, capsys):
    """The attack of the issue: every record's ids reversed, data and data checksum untouched."""
    _, store, x = _extract(tiny_folder, cache_dir, shard_size=6)
    for path in store.records_dir.glob("*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "image_ids": record["image_ids"][::-1]}))
    problems = store.verify()
    assert len(problems) == 2 and all("does not match its checksum" in p for p in problems)
    assert store.records() == {}  # not trusted, so never read
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 1
    assert "2 problems" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache", str(cache_dir)]) == 0
    assert capsys.readouterr().out.count("untrusted record") == 2 and not list(store.records_dir.iterdir())
    report, store, again = _extract(tiny_folder, cache_dir, shard_size=6)
    assert (report.computed, report.reused) == (12, 0)
    assert np.array_equal(again, x) and store.verify() == []


def test_records_of_the_first_format_are_not_trusted(tiny_folder, cache_dir):
    """Records without the checksum over their ids (written before it existed) cannot be verified: verify
    says so, and the next extraction computes them again rather than trusting their ids."""
    _, store, x = _extract(tiny_folder, cache_dir, shard_size=6)
    for path in store.records_dir.glob("*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("format", "checksum")}))
    problems = store.verify()
    assert len(problems) == 2 and all("older version" in p and "computes the shard again" in p for p in problems)
    report, store, again = _extract(tiny_folder, cache_dir, shard_size=6)
    assert report.computed == 12 and np.array_equal(again, x) and store.verify() == []


def test_a_record_moved_into_another_key_fails_its_checksum(tiny_folder, cache_dir):
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, layers=["head", "stage1"])
    head, stage1 = (FeatureStore(cache_dir / fs.cache_key) for fs in report.feature_sets.values())
    (record,) = head.records_dir.glob("*.json")
    (stage1.records_dir / record.name).write_bytes(record.read_bytes())
    assert stage1.verify() == [f"{stage1.root.name}: shard {record.stem}: completion record does not match its "
                               "checksum (its image ids or fields were changed)"]


def test_invalid_meta_json_is_reported_repaired_by_extract_and_cleared_by_gc(tiny_folder, cache_dir, capsys,
                                                                              caplog):
    _, store, x = _extract(tiny_folder, cache_dir)
    meta = store.root / "meta.json"
    meta.write_text("{not json")
    assert store.verify()[0].startswith(f"{store.root.name}: meta.json is not valid JSON")
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 1
    assert "meta.json is not valid JSON" in capsys.readouterr().out
    assert main(["cache", "ls", "--cache", str(cache_dir)]) == 0  # listed, with what is unknown shown as ?
    assert store.root.name in capsys.readouterr().out

    report, store, again = _extract(tiny_folder, cache_dir)  # the key is known: meta.json is written again
    assert (report.computed, report.reused) == (0, 12) and np.array_equal(again, x)
    assert "written again from the key" in caplog.text and store.verify() == []

    meta.write_text("{not json")
    assert main(["cache", "gc", "--cache", str(cache_dir)]) == 0
    assert f"removed {store.root.name}: unreadable key (meta.json is not valid JSON" in capsys.readouterr().out
    assert not store.root.exists()
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 0
    assert _extract(tiny_folder, cache_dir)[0].computed == 12


def test_edited_meta_json_is_reported(tiny_folder, cache_dir):
    _, store, _ = _extract(tiny_folder, cache_dir)
    meta = json.loads((store.root / "meta.json").read_text())
    (store.root / "meta.json").write_text(json.dumps({**meta, "dim": meta["dim"] + 1}))
    assert store.verify() == [f"{store.root.name}: meta.json does not describe this key (edited, or written by "
                              "another version)"]
    with pytest.raises(Exception, match="does not describe this key"):
        store.read([])


def test_a_key_without_meta_json_is_reported_not_ok_and_cleared_by_gc(tiny_folder, cache_dir, capsys):
    _, store, _ = _extract(tiny_folder, cache_dir)
    (store.root / "meta.json").unlink()
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{store.root.name}: meta.json is missing" in out and ": OK" not in out
    assert main(["cache", "gc", "--cache", str(cache_dir)]) == 0
    assert "unreadable key (meta.json is missing)" in capsys.readouterr().out and not store.root.exists()


def test_gc_leaves_folders_that_are_not_keys_alone(tiny_folder, cache_dir, capsys):
    _extract(tiny_folder, cache_dir)
    for name in ("notes", "photos-0123456789abcdef"):  # the second is named like a key, but holds no key
        (cache_dir / name).mkdir()
        (cache_dir / name / "keep.txt").write_text("mine")
    assert main(["cache", "gc", "--cache", str(cache_dir)]) == 0
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 0
    assert all((cache_dir / name / "keep.txt").is_file() for name in ("notes", "photos-0123456789abcdef"))


# --------------------------------------------------------------------------- an injected full disk

class _FullDisk:
    """A file whose every write fails as on a full disk (the temporary file itself is created)."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, _data):
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _full_open(*args, **kwargs):
    return _FullDisk(open(*args, **kwargs))  # noqa: SIM115 - the wrapper closes it


@pytest.fixture
def full_disk(monkeypatch):
    """Every write of the durable writer (pipeline.core.io) fails with ENOSPC."""
    monkeypatch.setattr(core_io, "open", _full_open, raising=False)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_full_disk_in_run_is_one_line_and_keeps_the_previous_outputs(tmp_path, capsys, monkeypatch):
    train = make_folder(tmp_path / "train", classes=2, per_class=4)
    test = make_folder(tmp_path / "test", classes=2, per_class=2, start_seed=100)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{train: {train}, test: {test}}}\n"
                      f"features: {{backbones: [{TINY}], cache_dir: {tmp_path / 'cache'}}}\n"
                      "heads:\n  - {name: logreg, type: logistic_regression, C: 1.0}\n"
                      f"output_dir: {out}\n")
    assert main(["run", str(config), "--quiet"]) == 0
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "predictions.csv")}
    capsys.readouterr()
    monkeypatch.setattr(core_io, "open", _full_open, raising=False)
    assert main(["run", str(config), "--quiet"]) == 2
    # the first file a run writes, right after extraction, is its skip list
    assert _one_error_line(capsys.readouterr().err) == f"error: cannot write {out / 'skipped.csv'}: {NO_SPACE}"
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _leftovers(out) == []


def test_full_disk_in_predict_keeps_the_previous_csv(tmp_path, full_disk):
    bundle = SimpleNamespace(classes=["a", "b"], decision=DecisionRule())
    result = SimpleNamespace(bundle=bundle, rows=lambda: [["x.jpg", "id", "a", "1", "0"]])
    out = tmp_path / "predictions.csv"
    out.write_text("the previous predictions\n")
    with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(out))}: {NO_SPACE}$"):
        write_predictions(result, out)
    assert out.read_text() == "the previous predictions\n" and _leftovers(tmp_path) == []


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, full_disk):
    import torch

    from pipeline.tuning.training import _save_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")
    with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(path))}: {NO_SPACE}$"):
        _save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(4)})
    assert path.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_a_batch_run_that_cannot_write_its_log_line_says_so_and_exits_1(tmp_path, capsys, monkeypatch):
    train = make_folder(tmp_path / "train", classes=2, per_class=4)
    head = tmp_path / "lr.joblib"
    assert main(["fit", "--data", str(train), "--type", "logistic_regression", "--backbone", TINY,
                 "--cache", str(tmp_path / "cache"), "--out", str(head), "--quiet"]) == 0
    incoming = make_folder(tmp_path / "incoming", classes=1, per_class=3, start_seed=300)
    log = tmp_path / "runs.jsonl"
    config = tmp_path / "batch.yaml"
    config.write_text(json.dumps({"inputs": [str(incoming)], "heads": {"lr": str(head)},
                                  "features": {"cache_dir": str(tmp_path / "cache")},
                                  "output_dir": str(tmp_path / "predictions"), "log": str(log)}))
    capsys.readouterr()

    def appending_fails(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller's `with`
        return _FullDisk(fh) if mode == "a+b" else fh  # "a+b": the log line; the lock and checks still work

    monkeypatch.setattr(batch_state, "open", appending_fails, raising=False)
    assert main(["batch", str(config), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "run " in captured.out and ": failed |" in captured.out
    assert _one_error_line(captured.err) == (f"error: cannot write {log}: {NO_SPACE} (this run's log line was not "
                                             "written; the next run logs its files as recovered)")
    assert len(list((tmp_path / "predictions" / "lr").glob("run-*.csv"))) == 1  # the predictions are kept

    monkeypatch.undo()
    assert main(["batch", str(config), "--quiet"]) == 0
    assert [e["status"] for e in read_log(log)] == ["recovered", "ok"]


# --------------------------------------------------------------------------- a real full disk, a read-only cache

def _mount(*args: str) -> str | None:
    """None, or why it failed."""
    if os.geteuid() != 0:
        return "mounting needs root (the tests are not running as root)"
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount failed: {exc}"
    return None if done.returncode == 0 else f"mount failed: {done.stderr.strip() or done.returncode}"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 200 KB tmpfs."""
    folder = tmp_path / "disk"
    folder.mkdir()
    why = _mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder))
    if why:
        pytest.skip(f"no small tmpfs: {why}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh, pytest.raises(OSError) as full:
        while True:
            fh.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


@contextmanager
def _read_only(folder: Path):
    """`folder` mounted read-only over itself (chmod does not stop root)."""
    why = _mount("--bind", str(folder), str(folder))
    if why:
        pytest.skip(f"no read-only bind mount: {why}")
    try:
        why = _mount("-o", "remount,bind,ro", str(folder))
        if why:
            pytest.skip(f"no read-only bind mount: {why}")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_real_full_disk_keeps_the_previous_file(tiny_disk):
    target = tiny_disk / "metrics.json"
    write_json_atomic(target, {"accuracy": 0.9})
    with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(target))}: {NO_SPACE}$"):
        write_json_atomic(target, {"rows": ["x" * 100] * 3000})  # 300 KB on a 200 KB disk
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["metrics.json"]


def test_a_real_full_disk_during_extract_is_one_line_and_leaves_whole_shards(tmp_path, tiny_folder, tiny_disk,
                                                                           capsys):
    cache = tiny_disk / "cache"
    other = make_folder(tmp_path / "other", classes=1, per_class=1, start_seed=900)
    assert _cli_extract(other, cache) == 0  # the key exists; the next shard finds the disk full
    filler = _fill(tiny_disk)
    capsys.readouterr()
    assert _cli_extract(tiny_folder, cache) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert re.fullmatch(f"error: cannot write the feature cache {re.escape(str(cache))}/{TINY}-[^ ]+: {NO_SPACE}",
                        line), line
    filler.unlink()
    assert list((cache / ".staging").iterdir()) == []  # the half-written array went
    assert main(["cache", "verify", "--cache", str(cache)]) == 0
    assert _cli_extract(tiny_folder, cache) == 0
    assert "rows computed: 12" in capsys.readouterr().out


def test_a_fully_cached_extract_works_on_a_read_only_cache(tmp_path, tiny_folder, cache_dir, capsys):
    assert _cli_extract(tiny_folder, cache_dir) == 0
    capsys.readouterr()
    with _read_only(cache_dir):
        with pytest.raises(OSError) as denied:
            (cache_dir / "probe").write_text("x")
        assert denied.value.errno == errno.EROFS
        assert _cli_extract(tiny_folder, cache_dir) == 0
        captured = capsys.readouterr()
        assert "rows computed: 0 | rows reused: 12" in captured.out
        assert _one_error_line(captured.err) == (f"warning: cannot write {cache_dir / 'skipped.csv'}: "
                                                 f"{os.strerror(errno.EROFS)} (nothing was skipped)")
        assert main(["cache", "verify", "--cache", str(cache_dir)]) == 0
        capsys.readouterr()

        (tiny_folder / "class0" / "broken.jpg").write_bytes(b"")  # a skip that must not be lost
        assert _cli_extract(tiny_folder, cache_dir) == 2
        assert "--skipped FILE writes their list elsewhere" in capsys.readouterr().err
        assert _cli_extract(tiny_folder, cache_dir, "--skipped", str(tmp_path / "skipped.csv")) == 0
        assert "empty file" in (tmp_path / "skipped.csv").read_text()
