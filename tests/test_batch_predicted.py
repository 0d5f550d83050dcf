"""What a batch run holds per file: the predicted ids read back as digests (the latest row of each id wins,
rows of another head file do not count), and the streamed scan, which keeps paths only of content some
head still lacks (with their copies) and of the skip record's files that it met."""

import csv
import os
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.app import batch_predicted, batch_scan
from pipeline.app.batch import _stream
from pipeline.app.batch_predicted import PredictedIds, digests, predicted_ids
from pipeline.app.batch_scan import Scan, identify
from pipeline.images.data import content_id

HEAD, OTHER = "a" * 64, "b" * 64
HEADER = ["run_id", "head", "head_sha256", "path", "image_id", "label"]


def _run_file(folder: Path, run: int, rows: list[list[str]], header: list[str] = HEADER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"run-2026{run:010d}.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def _row(image_id: str, sha: str) -> list[str]:
    return ["r", "h", sha, f"/img/{image_id[:6]}.jpg", image_id, "class0"]


def _ids(n: int) -> list[str]:
    return [content_id(b"image %d" % i) for i in range(n)]


def _holds(done: PredictedIds, ids: list[str]) -> set[str]:
    return {image_id for image_id, has in zip(ids, done.by_earlier_runs(digests(ids)), strict=True) if has}


def test_the_latest_row_of_an_id_wins_and_rows_of_another_head_file_do_not_count(tmp_path):
    a, b, c, d, never = _ids(5)
    _run_file(tmp_path, 1, [_row(a, HEAD), _row(b, HEAD), _row(c, HEAD)])
    _run_file(tmp_path, 2, [_row(b, OTHER), _row(d, OTHER)])  # the head was refitted: b and d by the other
    _run_file(tmp_path, 3, [_row(c, OTHER), _row(c, HEAD)])  # then put back: c's last row is this head's
    done = predicted_ids(tmp_path, HEAD)
    assert _holds(done, [a, b, c, d, never]) == {a, c}
    assert _holds(predicted_ids(tmp_path, OTHER), [a, b, c, d, never]) == {b, d}
    assert _holds(predicted_ids(tmp_path / "no-such-head", HEAD), [a, b]) == set()
    assert b not in done and a in done
    done.add(b)  # predicted by this run
    assert b in done and d not in done and _holds(done, [a, b, d]) == {a}


def test_ids_no_image_can_have_and_odd_rows_are_left_out(tmp_path):
    a, b, c, d = _ids(4)
    _run_file(tmp_path, 1, [_row(a, HEAD), _row(b.upper(), HEAD), _row(c[:-1], HEAD), ["r", "h"], [],
                            _row(d, HEAD)[:5]])  # a row cut short after its id still counts
    _run_file(tmp_path, 2, [["r", c]], header=["run_id", "image_id"])  # no head_sha256: no head's
    _run_file(tmp_path, 3, [[c, HEAD]], header=["image", "head_sha256"])  # no image_id: nothing
    assert _holds(predicted_ids(tmp_path, HEAD), [a, b, c, d]) == {a, d}


@pytest.mark.parametrize("seed", range(6))
def test_predicted_ids_match_reading_every_row_into_a_dict(tmp_path, monkeypatch, seed):
    """Against the plain definition (each id's last row over the files in order, kept when its head
    SHA-256 is this one), over random histories of one or two head files, with repeats and chunks."""
    monkeypatch.setattr(batch_predicted, "_ROWS", 7)
    rng = random.Random(seed)
    pool = _ids(60)
    for run in range(rng.randint(1, 5)):
        sha = rng.choice([HEAD, OTHER] if seed % 3 else [HEAD])
        _run_file(tmp_path, run, [_row(rng.choice(pool), rng.choice([sha, sha, OTHER]) if seed % 2 else sha)
                                  for _ in range(rng.randint(0, 40))])
    latest: dict[str, str] = {}
    for path in sorted(tmp_path.glob("run-*.csv")):
        with open(path, newline="") as fh:
            latest.update((row["image_id"], row["head_sha256"]) for row in csv.DictReader(fh))
    for sha in (HEAD, OTHER):
        assert _holds(predicted_ids(tmp_path, sha), pool) == {i for i, s in latest.items() if s == sha}


def _folder(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "incoming"
    files = {name: root / name for name in ("a.jpg", "b.jpg", "b-copy.jpg", "c.jpg", "sub/d.jpg")}
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"same as b" if name.startswith("b") else name.encode())
    past = time.time() - 60
    for path in files.values():
        os.utime(path, (past, past))
    return root, files


def test_the_streamed_scan_keeps_only_content_some_head_lacks(tmp_path):
    root, files = _folder(tmp_path)
    ids = {name: content_id(path.read_bytes()) for name, path in files.items()}
    known = {str(files["c.jpg"]): {}, str(tmp_path / "elsewhere.jpg"): {}}  # the skip record's paths
    everything = PredictedIds(digests(sorted(set(ids.values()))))
    for _run in range(2):  # the second time through the stat memo
        found = _stream(Scan([root], tmp_path / "cache"), [everything], known)
        assert (found.first_path, found.later_copies, found.unreadable) == ({}, {}, [])
        assert found.looked_at == {str(files["c.jpg"])}

    only_a = PredictedIds(digests([ids["a.jpg"]]))
    all_but_d = PredictedIds(digests(sorted({i for name, i in ids.items() if name != "sub/d.jpg"})))
    found = _stream(Scan([root], tmp_path / "cache"), [all_but_d, only_a], known)
    assert found.first_path == {ids["b-copy.jpg"]: str(files["b-copy.jpg"]), ids["c.jpg"]: str(files["c.jpg"]),
                                ids["sub/d.jpg"]: str(files["sub/d.jpg"])}  # in scan order: b-copy sorts first
    assert found.later_copies == {str(files["b-copy.jpg"]): [files["b.jpg"]]}


@pytest.mark.parametrize("list_first", [True, False])
def test_overlapping_inputs_give_each_path_once(tmp_path, list_first):
    root, files = _folder(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(files[name]) for name in ("c.jpg", "a.jpg", "c.jpg")))
    found = identify([listing, root] if list_first else [root, listing], tmp_path / "cache")
    assert sorted(found.paths) == sorted(map(str, files.values())) and len(found.paths) == len(files)


def test_the_memory_of_a_rerun_does_not_grow_with_files_already_predicted(tmp_path, monkeypatch):
    """Python's allocations while streaming 2,000 and 8,000 files that every head has predicted (through
    a filled stat memo, as on an unchanged rerun): the run before this one held about 500 bytes a file."""
    monkeypatch.setattr(batch_scan, "BLOCK", 500)
    peaks = []
    for count in (2000, 8000):
        root = tmp_path / f"files_{count}"
        for i in range(count):
            (root / f"{i // 1000}").mkdir(parents=True, exist_ok=True)
            (root / f"{i // 1000}" / f"{i}.jpg").write_bytes(b"file %d" % i)
        past = time.time() - 60
        for path in root.rglob("*.jpg"):
            os.utime(path, (past, past))
        ids = identify([root], tmp_path / "cache").ids
        done = PredictedIds(np.unique(digests([i for i in ids if i is not None])))
        tracemalloc.start()
        found = _stream(Scan([root], tmp_path / "cache"), [done], {})
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert found.first_path == {} and len(ids) == count
    assert peaks[1] - peaks[0] < 6000 * 16, peaks  # not even a digest's worth per file
