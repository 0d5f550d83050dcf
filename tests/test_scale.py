"""Batch runs at scale: the stat memo (unchanged files are not opened; --rehash; a damaged memo is rebuilt),
the cache index (rebuilt when missing, followed when stale, checked by `cache verify`, never trusted by a
read), the streaming scan, and the pruning of skipped.json."""

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.app import batch_scan
from pipeline.app.batch import run_batch
from pipeline.app.batch_heads import CHECKED_HEADS, HeadUnusable
from pipeline.app.batch_scan import identify
from pipeline.cli.main import main
from pipeline.core.errors import CacheError
from pipeline.core.hashing import file_sha256
from pipeline.features.cache import FeatureStore
from pipeline.features.extract import extract
from pipeline.features.index import INDEX_NAME
from pipeline.images.data import content_id, iter_files, walk_files
from pipeline.images.statmemo import MEMO_NAME, StatMemo

from . import test_batch, test_hostile_disk
from .conftest import TINY, make_folder
from .test_batch import _config, _place_head

heads = test_batch.heads  # the fixture of tests/test_batch.py: two heads fitted with the tiny backbone
tiny_disk = test_hostile_disk.tiny_disk  # a real 200 KB tmpfs

_OPENED: list[str] | None = None  # while a `counting_opens` block runs: every file Python opens


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only inside `counting_opens`


@contextmanager
def counting_opens(folder: Path):
    """The files under `folder` opened (by Python code, in this process) inside the block."""
    global _OPENED
    _OPENED = []
    opened: list[str] = []
    try:
        yield opened
    finally:
        opened += [p for p in _OPENED if p.startswith(str(folder))]
        _OPENED = None


def _settled(folder: Path, *files: Path) -> Path:
    """Files (all under `folder`, or those given) as if written a minute ago: the memo does not remember
    files modified in the last two seconds."""
    past = time.time() - 60
    for path in files or folder.rglob("*"):
        os.utime(path, (past, past))
    return folder


def test_an_unchanged_file_is_not_opened_on_a_rerun_and_a_changed_one_is(tmp_path, heads):
    data = _settled(make_folder(tmp_path / "incoming", classes=2, per_class=3, start_seed=700))
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    with counting_opens(data) as opened:
        first = run_batch(config, progress=False)
    assert (first.predicted, first.opened) == (6, 6) and len(opened) == 12  # hashed, then decoded
    assert (tmp_path / "batch" / "cache" / MEMO_NAME).is_file()

    with counting_opens(data) as opened:
        rerun = run_batch(config, progress=False)
    assert (rerun.seen, rerun.opened, rerun.predicted, rerun.computed) == (6, 0, 0, 0) and opened == []

    changed = data / "class0" / "img0.jpg"
    other = data / "class1" / "img2.jpg"
    changed.write_bytes(other.read_bytes())  # new content, new mtime: read again, and a copy of a known image
    (data / "class1" / "new.jpg").write_bytes((data / "class0" / "img1.jpg").read_bytes()[:-1] + b"\xd9")
    _settled(data, changed, data / "class1" / "new.jpg")
    with counting_opens(data) as opened:
        third = run_batch(config, progress=False)
    assert third.opened == 2 and set(opened) == {str(changed), str(data / "class1" / "new.jpg")}  # + its decode


def test_rehash_reads_every_file_and_gives_the_same_ids(tmp_path, heads, capsys):
    data = _settled(make_folder(tmp_path / "incoming", classes=1, per_class=4, start_seed=720))
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    assert main(["batch", str(config), "--quiet"]) == 0
    with counting_opens(data) as opened:
        assert main(["batch", str(config), "--quiet", "--rehash"]) == 0
    out = capsys.readouterr().out
    assert len(opened) == 4 and "files read: 4 |" in out and "predicted: 0 |" in out
    with counting_opens(data) as opened:
        assert main(["batch", str(config), "--quiet"]) == 0
    assert opened == [] and "files read: 0 |" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["garbage", "tampered row"])
def test_a_damaged_memo_is_rebuilt_never_trusted(tmp_path, heads, caplog, damage):
    data = _settled(make_folder(tmp_path / "incoming", classes=1, per_class=3, start_seed=740))
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    assert run_batch(config, progress=False).predicted == 3
    memo = tmp_path / "batch" / "cache" / MEMO_NAME
    victim = data / "class0" / "img1.jpg"
    if damage == "garbage":
        for suffix in ("-wal", "-shm"):
            Path(f"{memo}{suffix}").unlink(missing_ok=True)
        memo.write_bytes(os.urandom(4096))
    else:  # another image's id under this file's stat: what a flipped bit in the id column would do
        with sqlite3.connect(memo) as db:
            db.execute("UPDATE memo SET id = ? WHERE name = ?", ("f" * 32, b"img1.jpg"))
    with counting_opens(data) as opened:
        rerun = run_batch(config, progress=False)
    assert (rerun.predicted, rerun.new, rerun.skipped) == (0, 0, 0)  # the right ids: nothing looks new
    assert opened == ([str(p) for p in sorted((data / "class0").iterdir())] if damage == "garbage" else [str(victim)])
    if damage == "garbage":
        assert "stat memo" in caplog.text and "damaged" in caplog.text
    with counting_opens(data) as opened:
        assert run_batch(config, progress=False).opened == 0
    assert opened == []


def test_the_memo_can_be_deleted_any_time(tmp_path, heads):
    data = _settled(make_folder(tmp_path / "incoming", classes=1, per_class=2, start_seed=760))
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    run_batch(config, progress=False)
    for path in (tmp_path / "batch" / "cache").glob(f"{MEMO_NAME}*"):
        path.unlink()
    rerun = run_batch(config, progress=False)
    assert (rerun.opened, rerun.predicted, rerun.new) == (2, 0, 0)


def test_the_streaming_scan_gives_sorted_paths_and_reports_progress(tmp_path, heads):
    root = tmp_path / "incoming"
    for name in ("b/x.jpg", "a.jpg", "a/z.jpg", "a-b.jpg", "a/b/c.jpg", ".hidden.jpg", "c/.partial/y.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    skipped: list[tuple[str, str]] = []
    streamed = [Path(path) for path, _stat in iter_files(root, lambda p, r: skipped.append((p, r)))]
    assert streamed == sorted(streamed) == walk_files(root)[0] and len(streamed) == 5 and skipped == []

    data = make_folder(tmp_path / "photos", classes=1, per_class=3, start_seed=780)
    counts: list[tuple[int, bool]] = []
    entry = run_batch(_config(tmp_path, [data], {"lr": heads / "lr.skops"}), progress=False,
                      on_scan=lambda files, done: counts.append((files, done)))
    assert entry.predicted == 3 and counts[-1] == (3, True) and all(not done for _n, done in counts[:-1])


_RERUN = """
import json, sys
from pipeline.cli.main import main
code = main(["batch", sys.argv[1], "--quiet"])
print(json.dumps({"code": code, "imported": [m for m in ("torch", "sklearn", "skops") if m in sys.modules]}))
"""


def _rerun(config: Path) -> dict:
    """`pipeline batch CONFIG` in a fresh process: its exit code and which heavy libraries it imported."""
    done = subprocess.run([sys.executable, "-c", _RERUN, str(config)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.splitlines()[-1])


def _one_head_batch(tmp_path: Path, heads: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    """A folder of `per_class` settled images, the logistic head as `model.skops`, and a batch config over
    them, run once; returns (head, config)."""
    data = _settled(make_folder(tmp_path / "incoming", classes=1, per_class=per_class, start_seed=seed))
    head = tmp_path / "model.skops"
    _place_head(heads, "lr.skops", head)
    config = _config(tmp_path, [data], {"lr": head})
    assert run_batch(config, progress=False).predicted == per_class
    return head, config


def test_an_unchanged_rerun_loads_no_head_and_a_changed_head_is_loaded(tmp_path, heads):
    head, config = _one_head_batch(tmp_path, heads, per_class=3, seed=800)
    record = tmp_path / "batch" / "predictions" / CHECKED_HEADS
    assert json.loads(record.read_text()) == {str(head): file_sha256(head)}
    assert _rerun(config) == {"code": 0, "imported": []}  # no torch, scikit-learn or skops
    record.write_text("{not json")  # a damaged record vouches for nothing: the head is loaded, the record made anew
    assert _rerun(config) == {"code": 0, "imported": ["torch", "sklearn", "skops"]}
    assert json.loads(record.read_text()) == {str(head): file_sha256(head)}

    _place_head(heads, "knn.skops", head)  # another head under the same name: loaded before the run, predicts all
    assert _rerun(config) == {"code": 0, "imported": ["torch", "sklearn", "skops"]}
    assert json.loads(record.read_text()) == {str(head): file_sha256(head)}
    log = tmp_path / "batch" / "runs.jsonl"
    assert json.loads(log.read_text().splitlines()[-1])["predicted"] == 3

    logged = log.read_text()
    head.write_bytes(b"not a head")  # a changed file is never taken on the record's word
    assert main(["batch", str(config), "--quiet"]) == 2 and log.read_text() == logged


def test_a_head_checked_earlier_is_loaded_when_it_has_work_and_fails_then_if_unusable(tmp_path, heads):
    head, config = _one_head_batch(tmp_path, heads, per_class=2, seed=810)
    Path(f"{head}.sha256").write_text("0" * 64)  # the head's own bytes are as the record says, its check fails
    log = tmp_path / "batch" / "runs.jsonl"
    assert run_batch(config, progress=False).exit_code == 0  # nothing to predict: the head is not loaded
    make_folder(tmp_path / "incoming", classes=1, per_class=3, start_seed=810)  # one new image
    with pytest.raises(HeadUnusable, match="sha256"):
        run_batch(config, progress=False)
    assert len(log.read_text().splitlines()) == 2 and len(list((tmp_path / "batch" / "predictions").glob("*/*"))) == 1


def _memo_rows(cache: Path) -> set[str]:
    """The files the cache's stat memo has a row of."""
    with closing(sqlite3.connect(cache / MEMO_NAME)) as db:
        return {os.fsdecode(folder + b"/" + name) for folder, name in db.execute("SELECT dir, name FROM memo")}


def test_the_memo_forgets_deleted_files_once_a_scan_completes(tmp_path, monkeypatch):
    root, other = tmp_path / "incoming", tmp_path / "other"
    names = ["a/1.jpg", "a/2.jpg", "a/b/3.jpg", "a/d/6.jpg", "c/4.jpg", "a-z/5.jpg"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"image %d" % i)
    (other / "7.jpg").parent.mkdir()
    (other / "7.jpg").write_bytes(b"image 7")  # another input sharing the cache, not scanned below
    _settled(root), _settled(other)
    cache = tmp_path / "cache"
    identify([root, other], cache)
    everything = {str(root / name) for name in names} | {str(other / "7.jpg")}
    assert _memo_rows(cache) == everything

    (root / "a" / "2.jpg").unlink()
    shutil.rmtree(root / "c")
    monkeypatch.setattr(batch_scan, "BLOCK", 2)

    def stop(files: int, done: bool) -> None:
        if files >= 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # a run that stops before its scan ends prunes nothing
        identify([root], cache, on_progress=stop)
    assert _memo_rows(cache) == everything

    (root / "a" / "d").rename(tmp_path / "unmounted")  # a link to a folder that is not there: rows kept
    (root / "a" / "d").symlink_to(tmp_path / "unmounted")
    found = identify([root], cache)
    assert found.opened == 0 and sorted(found.paths) == sorted(str(root / n) for n in ["a/1.jpg", "a/b/3.jpg",
                                                                                     "a/d/6.jpg", "a-z/5.jpg"])
    (tmp_path / "unmounted").rename(tmp_path / "elsewhere")
    found = identify([root], cache)
    assert str(root / "a" / "d") in found.skipped
    assert _memo_rows(cache) == everything - {str(root / "a" / "2.jpg"), str(root / "c" / "4.jpg")}


def test_pruning_keeps_the_rows_of_files_met_out_of_order(tmp_path, monkeypatch):
    root = tmp_path / "incoming"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(b"image %d" % i)
    _settled(root)
    listing = tmp_path / "list.txt"  # the list comes first, out of order: each block's range holds others
    listing.write_text("\n".join(str(root / f"{i}.jpg") for i in (0, 5, 1, 4, 2, 3)))
    cache = tmp_path / "cache"
    monkeypatch.setattr(batch_scan, "BLOCK", 2)
    identify([listing, root], cache)
    assert identify([listing, root], cache).opened == 0 and len(_memo_rows(cache)) == 6
    (root / "4.jpg").unlink()
    listing.write_text("\n".join(str(root / f"{i}.jpg") for i in (0, 5, 1, 2, 3)))
    assert identify([listing, root], cache).opened == 0
    assert _memo_rows(cache) == {str(root / f"{i}.jpg") for i in (0, 1, 2, 3, 5)}


def test_a_full_disk_leaves_the_memo_as_it_is(tmp_path, tiny_disk, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"image %d" % i)
    _settled(folder)
    cache = tiny_disk / "cache"
    assert identify([folder], cache).opened == 3
    filler = test_hostile_disk._fill(tiny_disk)
    assert identify([folder], cache).opened == 3  # no memo while the disk is full: every file is read
    assert "no stat memo" in caplog.text and "damaged" not in caplog.text
    filler.unlink()
    assert identify([folder], cache).opened == 0  # and the memo is still there, not deleted as if damaged


def test_extract_identifies_files_through_the_memo(tmp_path, capsys):
    data = _settled(make_folder(tmp_path / "data", classes=2, per_class=3, start_seed=820))
    cache = tmp_path / "cache"
    args = ["extract", "--data", str(data), "--backbone", TINY, "--cache", str(cache), "--quiet"]
    assert main(args) == 0 and "files read: 6 |" in capsys.readouterr().out
    with counting_opens(data) as opened:
        assert main(args) == 0
    out = capsys.readouterr().out
    assert opened == [] and "files read: 0 |" in out and "rows reused: 6" in out
    with counting_opens(data) as opened:
        assert main([*args, "--rehash"]) == 0
    assert len(opened) == 6 and "files read: 6 |" in capsys.readouterr().out

    (data / "class0" / "img0.jpg").unlink()
    changed = data / "class1" / "img1.jpg"
    changed.write_bytes((data / "class1" / "img2.jpg").read_bytes())  # a copy: 4 distinct images
    _settled(data, changed)
    with counting_opens(data) as opened:
        assert main(args) == 0
    assert opened == [str(changed)] and "images: 5 | rows computed: 0 | rows reused: 4" in capsys.readouterr().out
    assert _memo_rows(cache) == {str(p) for p in data.rglob("*.jpg")}


def test_skipped_json_drops_paths_its_config_no_longer_lists(tmp_path, heads):
    kept = make_folder(tmp_path / "kept", classes=1, per_class=1, start_seed=790)
    dropped = make_folder(tmp_path / "dropped", classes=1, per_class=1, start_seed=795)
    (kept / "class0" / "bad.jpg").write_bytes(b"not an image")
    (dropped / "class0" / "bad.jpg").write_bytes(b"not an image either")
    config = _config(tmp_path, [kept, dropped], {"lr": heads / "lr.skops"})
    other = _config(tmp_path, [make_folder(tmp_path / "elsewhere", classes=1, per_class=1, start_seed=799)],
                    {"lr": heads / "lr.skops"}, name="other")
    raw = json.loads(other.read_text())
    (Path(raw["inputs"][0]) / "class0" / "bad.jpg").write_bytes(b"broken too")
    other.write_text(json.dumps({**raw, "output_dir": json.loads(config.read_text())["output_dir"]}))
    assert run_batch(config, progress=False).new_skipped == 2
    assert run_batch(other, progress=False).new_skipped == 1
    record = tmp_path / "batch" / "predictions" / "skipped.json"
    assert len(json.loads(record.read_text())) == 3

    config.write_text(json.dumps({**json.loads(config.read_text()), "inputs": [str(kept)]}))
    assert run_batch(config, progress=False).exit_code == 0
    entries = json.loads(record.read_text())
    assert str(dropped / "class0" / "bad.jpg") not in entries  # its config no longer lists it
    assert str(kept / "class0" / "bad.jpg") in entries and len(entries) == 2  # the other config's stays
    assert entries[str(kept / "class0" / "bad.jpg")]["config"] == str(config)


def _store(tmp_path: Path, per_class: int = 4, shard_size: int = 4) -> tuple[FeatureStore, list[str]]:
    data = make_folder(tmp_path / "data", classes=2, per_class=per_class)
    report = extract(data, TINY, cache_dir=tmp_path / "cache", shard_size=shard_size, progress=False)
    fs = next(iter(report.feature_sets.values()))
    return FeatureStore(tmp_path / "cache" / fs.cache_key), fs.image_ids


def _from_records(store: FeatureStore) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for shard, record in sorted(store.records().items()):
        for row, image_id in enumerate(record["image_ids"]):
            found.setdefault(image_id, (shard, row))
    return found


def test_the_index_is_rebuilt_when_missing_and_follows_the_records(tmp_path):
    store, ids = _store(tmp_path)
    index_file = store.root / INDEX_NAME
    assert index_file.is_file() and store.index() == _from_records(store) and len(store.index()) == 8
    expected = store.read(ids).compute()

    store.lookup.close()  # another process, later: the index file is gone
    from pipeline.features import index as index_module
    index_module._OPEN.clear()
    for path in store.root.glob(f"{INDEX_NAME}*"):
        path.unlink()
    assert store.index() == _from_records(store) and index_file.is_file()
    np.testing.assert_array_equal(store.read(ids).compute(), expected)

    gone = sorted(store.records())[0]  # a record removed behind the index's back: its rows leave it
    (store.records_dir / f"{gone}.json").unlink()
    assert store.index() == _from_records(store) and len(store.index()) == 4
    with pytest.raises(CacheError, match="not in cache"):
        store.read(ids)
    report = extract(tmp_path / "data", TINY, cache_dir=tmp_path / "cache", shard_size=4, progress=False)
    assert report.computed == 4 and len(store.index()) == 8  # recomputed, and found through the index


def test_an_index_damaged_or_edited_is_caught_by_verify_and_by_reads(tmp_path, capsys):
    store, ids = _store(tmp_path)
    before = store.read(ids).compute()
    with sqlite3.connect(store.root / INDEX_NAME) as db:  # two images' rows exchanged
        (a, ra), (b, rb) = db.execute("SELECT id, row FROM rows WHERE shard = (SELECT MIN(shard) FROM rows) "
                                      "ORDER BY row LIMIT 2").fetchall()
        db.execute("UPDATE rows SET row = ? WHERE id = ?", (rb, a))
        db.execute("UPDATE rows SET row = ? WHERE id = ?", (ra, b))
    with pytest.raises(CacheError, match="index disagrees"):
        store.read(ids).compute()
    assert main(["cache", "verify", "--cache", str(tmp_path / "cache")]) != 0
    assert "index.sqlite disagrees with the completion record of shard" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache", str(tmp_path / "cache")]) == 0
    assert main(["cache", "verify", "--cache", str(tmp_path / "cache")]) == 0
    np.testing.assert_array_equal(store.read(ids).compute(), before)

    (store.root / INDEX_NAME).write_bytes(os.urandom(8192))  # garbage: rebuilt from the records on opening
    from pipeline.features import index as index_module
    index_module._OPEN.clear()
    np.testing.assert_array_equal(store.read(ids).compute(), before)


_IDENTIFY = """
import sys
from pathlib import Path
from pipeline.images.data import iter_files
from pipeline.images.statmemo import StatMemo
files = [(str(p), s) for p, s in iter_files(sys.argv[2], print)]
with StatMemo(Path(sys.argv[1])) as memo:
    for start in range(0, len(files), 16):  # many small transactions, interleaved with the other process
        assert None not in memo.ids(files[start:start + 16])
"""


def test_several_processes_share_one_memo(tmp_path):
    folders = []
    for n in range(2):
        folder = tmp_path / f"in{n}"
        folder.mkdir()
        for i in range(200):
            (folder / f"{i:03d}.jpg").write_bytes(b"%d-%d" % (n, i))
        folders.append(_settled(folder))
    memo = tmp_path / MEMO_NAME
    procs = [subprocess.Popen([sys.executable, "-c", _IDENTIFY, str(memo), str(f)]) for f in folders]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    files = [(str(p), s) for f in folders for p, s in iter_files(f, print)]
    with StatMemo(memo) as shared:
        ids = shared.ids(files)
        assert shared.hashed == 0 and shared.hits == 400
    assert ids == [content_id(Path(p).read_bytes()) for p, _s in files]


def test_memo_locked_by_another_process_while_opening_is_waited_for(tmp_path):
    """A memo another connection holds locked while this one opens it is waited for, not given up: giving
    up means a run without a memo, every file read and none remembered. (This lock is waited out by the
    busy timeout; the conflicts SQLite reports at once, without the timeout, are retried in `_open` and
    were not reproduced here.)"""
    import threading

    path = tmp_path / MEMO_NAME
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE other (x)")
    threading.Timer(0.5, lambda: (holder.execute("COMMIT"), holder.close())).start()
    with StatMemo(path) as memo:
        assert memo.db is not None
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "a.jpg").write_bytes(b"a")
        files = [(str(p), s) for p, s in iter_files(_settled(folder), print)]
        assert memo.ids(files) == [content_id(b"a")]
    with StatMemo(path) as again:
        again.ids(files)
        assert again.hits == 1 and again.hashed == 0
