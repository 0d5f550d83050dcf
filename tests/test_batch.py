"""`pipeline batch`: incremental runs, the lock, kill -9 and resume, the run log, a cluster losing a worker."""

import csv
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest

from pipeline.app.batch import run_batch
from pipeline.app.batch_state import LOCK_NAME, read_log
from pipeline.cli.main import main
from pipeline.features.cache import FeatureStore
from pipeline.features.extract import extract

from .conftest import TINY, make_folder


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Two heads fitted on tiny labelled images with the tiny backbone: logistic regression on its default
    layer and kNN on stage1 (a second cache key, so the two heads' extractions are separate work)."""
    root = tmp_path_factory.mktemp("batch_heads")
    train = make_folder(root / "train", classes=3, per_class=6)
    for name, options in (("lr", ["--type", "logistic_regression", "--backbone", TINY]),
                          ("knn", ["--type", "knn", "--source", f"{TINY}:stage1"])):
        assert main(["fit", "--data", str(train), *options, "--cache", str(root / "cache"),
                     "--out", str(root / f"{name}.skops"), "--quiet"]) == 0
    return root


def _place_head(heads: Path, name: str, head: Path) -> None:
    """Copy the saved head `name` (and its .sha256 sidecar) to `head`, replacing what is there."""
    for suffix in ("", ".sha256"):
        shutil.copy(heads / f"{name}{suffix}", f"{head}{suffix}")


def _config(tmp_path: Path, inputs, heads: dict, name="batch", **features) -> Path:
    out = tmp_path / name
    config = {"inputs": [str(p) for p in inputs], "heads": {k: str(v) for k, v in heads.items()},
              "features": {"cache_dir": str(out / "cache"), **features},
              "output_dir": str(out / "predictions"), "log": str(out / "runs.jsonl")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "predictions").glob("*/run-*.csv")):
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def _by_image(rows: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(r["head"], r["image_id"]): {k: v for k, v in r.items() if k not in ("run_id", "path")} for r in rows}
    assert len(keyed) == len(rows), "duplicate prediction rows"
    return keyed


def test_unchanged_rerun_computes_nothing_and_appends_nothing(tmp_path, heads):
    data = make_folder(tmp_path / "incoming", classes=2, per_class=4, start_seed=500)
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    first = run_batch(config, progress=False)
    assert (first.exit_code, first.seen, first.new, first.predicted, first.computed) == (0, 8, 8, 8, 8)
    rows = _rows(tmp_path / "batch")
    assert len(rows) == 8 and {r["run_id"] for r in rows} == {first.run_id}
    assert all(abs(sum(float(r[f"p_class{i}"]) for i in range(3)) - 1) < 1e-4 for r in rows)
    files = {p: p.read_bytes() for p in (tmp_path / "batch" / "predictions").rglob("run-*.csv")}

    again = run_batch(config, progress=False)
    assert (again.exit_code, again.seen, again.new, again.predicted, again.computed) == (0, 8, 0, 0, 0)
    assert {p: p.read_bytes() for p in (tmp_path / "batch" / "predictions").rglob("run-*.csv")} == files
    log = read_log(tmp_path / "batch" / "runs.jsonl")
    assert [e["run_id"] for e in log] == [first.run_id, again.run_id]
    required = {"run_id", "started", "ended", "seen", "new", "skipped", "failed", "predicted", "seconds"}
    for entry in log:
        assert required <= entry.keys()
        assert entry["status"] == "ok" and entry["failed"] == 0 and entry["seconds"] >= 0


def test_added_files_are_processed_exactly_and_a_changed_head_predicts_again(tmp_path, heads):
    data = make_folder(tmp_path / "incoming", classes=2, per_class=4, start_seed=600)
    head = tmp_path / "model.skops"
    _place_head(heads, "lr.skops", head)
    config = _config(tmp_path, [data], {"lr": head})
    run_batch(config, progress=False)
    added = make_folder(data / "day2", classes=1, per_class=3, start_seed=700)
    (data / "day2" / "copy.jpg").write_bytes((data / "class0" / "img0.jpg").read_bytes())  # known content
    (data / ".upload-in-progress.jpg").write_bytes(b"partial")  # hidden: not looked at
    second = run_batch(config, progress=False)
    assert (second.seen, second.new, second.predicted, second.computed) == (12, 3, 3, 3)
    new_rows = [r for r in _rows(tmp_path / "batch") if r["run_id"] == second.run_id]
    assert sorted(r["path"] for r in new_rows) == sorted(str(p) for p in (added / "class0").iterdir())
    assert len(_by_image(_rows(tmp_path / "batch"))) == 11

    _place_head(heads, "knn.skops", head)  # the head file is replaced: every image is predicted again
    third = run_batch(config, progress=False)
    assert (third.new, third.predicted) == (11, 11)
    assert third.heads["lr"].sha256 != second.heads["lr"].sha256
    _place_head(heads, "lr.skops", head)  # put back: the latest rows came from the other file, so again
    assert run_batch(config, progress=False).predicted == 11
    assert run_batch(config, progress=False).predicted == 0


def test_bad_files_give_the_partial_exit_code_and_are_logged(tmp_path, heads, capsys):
    data = make_folder(tmp_path / "incoming", classes=1, per_class=3, start_seed=800)
    (data / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listing = tmp_path / "extra.txt"
    listing.write_text(f"{data / 'class0' / 'img0.jpg'}\nmissing.jpg\n")
    config = _config(tmp_path, [data, listing], {"lr": heads / "lr.skops"})
    assert main(["batch", str(config), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert "skipped " + str(data / "class0" / "broken.jpg") in out and "file not found" in out
    (entry,) = read_log(tmp_path / "batch" / "runs.jsonl")
    assert (entry["status"], entry["seen"], entry["new"], entry["skipped"], entry["predicted"]) == (
        "partial", 5, 4, 2, 3)
    # Still there: counted and listed again, but already reported, so the scheduled job stays green,
    # and the broken file is tried again without counting as new.
    assert main(["batch", str(config), "--quiet"]) == 0
    second = read_log(tmp_path / "batch" / "runs.jsonl")[-1]
    assert (second["status"], second["new"], second["skipped"], second["new_skipped"], second["predicted"]) == (
        "ok", 0, 2, 0, 0)
    assert len(_by_image(_rows(tmp_path / "batch"))) == 3
    (data / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 broken differently")  # changed: reported again
    assert main(["batch", str(config), "--quiet"]) == 3
    third = read_log(tmp_path / "batch" / "runs.jsonl")[-1]
    assert (third["new"], third["new_skipped"]) == (1, 1)


def test_the_skip_record_survives_a_corrupt_file_a_second_config_and_many_old_skips(tmp_path, heads, capsys):
    first = make_folder(tmp_path / "first", classes=1, per_class=1, start_seed=850)
    second = make_folder(tmp_path / "second", classes=1, per_class=1, start_seed=860)
    for i in range(25):
        (first / "class0" / f"bad{i:02d}.jpg").write_bytes(b"not an image %d" % i)
    (second / "class0" / "bad.jpg").write_bytes(b"not an image either")
    (second / "class0" / "bad-copy.jpg").write_bytes(b"not an image either")  # same bytes: skipped too
    listing = tmp_path / "queue.txt"
    listing.write_text(f"{tmp_path / 'never-uploaded.jpg'}\n")  # a listed path that does not exist
    config_a = _config(tmp_path, [first], {"lr": heads / "lr.skops"}, name="a")
    config_b = _config(tmp_path, [second, listing], {"lr": heads / "lr.skops"}, name="b")
    shared = json.loads(config_a.read_text())["output_dir"]
    config_b.write_text(json.dumps({**json.loads(config_b.read_text()), "output_dir": shared}))
    record = Path(shared) / "skipped.json"

    assert [run_batch(c, progress=False).new_skipped for c in (config_a, config_b)] == [25, 3]
    # Each config's run keeps the other's skips: neither reports them again.
    assert [run_batch(c, progress=False).exit_code for c in (config_a, config_b, config_a, config_b)] == [0] * 4
    assert len(json.loads(record.read_text())) == 28
    copy_reason = json.loads(record.read_text())[str(second / "class0" / "bad.jpg")]["reason"]
    assert copy_reason.endswith(f"(same bytes as {second / 'class0' / 'bad-copy.jpg'})")  # it sorts first

    (first / "class0" / "bad24.jpg").write_bytes(b"broken differently")  # past the first 20 listed
    capsys.readouterr()
    assert main(["batch", str(config_a), "--quiet"]) == 3
    entry = read_log(tmp_path / "a" / "runs.jsonl")[-1]
    assert entry["new_skipped_files"] == [{"path": str(first / "class0" / "bad24.jpg"), "reason": ANY}]
    out = capsys.readouterr().out
    assert f"skipped {first / 'class0' / 'bad24.jpg'}" in out and "24 files skipped as in earlier runs" in out

    (first / "class0" / "bad00.jpg").unlink()  # gone: it leaves the record
    run_batch(config_a, progress=False)
    assert str(first / "class0" / "bad00.jpg") not in json.loads(record.read_text())
    for corrupt in ("[]", "null", "{not json"):  # an unusable record: every skip is reported again
        record.write_text(corrupt)
        assert run_batch(config_b, progress=False).new_skipped == 3


def test_a_failure_while_working_is_logged_with_exit_code_1(tmp_path, heads, capsys):
    data = make_folder(tmp_path / "incoming", classes=1, per_class=2, start_seed=900)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    (data / "class0" / "broken.jpg").write_bytes(b"not an image")
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops", "knn": heads / "knn.skops"},
                     cache_dir=str(blocker / "cache"))
    assert main(["batch", str(config), "--quiet"]) == 1
    assert "cannot write the feature cache" in capsys.readouterr().err
    (entry,) = read_log(tmp_path / "batch" / "runs.jsonl")
    assert (entry["status"], entry["exit_code"], entry["predicted"]) == ("failed", 1, 0)
    assert (entry["seen"], entry["new"], entry["failed"]) == (3, 3, 3)  # images, whatever the number of heads
    assert not _rows(tmp_path / "batch")


def test_an_emptied_list_file_means_nothing_new(tmp_path, heads):
    queue = tmp_path / "queue.txt"
    queue.write_text("# paths are appended here by the upload service\n")
    config = _config(tmp_path, [queue], {"lr": heads / "lr.skops"})
    entry = run_batch(config, progress=False)
    assert (entry.status, entry.exit_code, entry.seen, entry.predicted) == ("ok", 0, 0, 0)


def test_a_file_rewritten_during_a_run_with_known_content_gets_no_second_row(tmp_path, heads, monkeypatch):
    """Ids come from hashing before the work, and decoding checks the bytes against them; a file that
    changed between the two to content already predicted is written once only."""
    from pipeline.images.statmemo import StatMemo

    data = make_folder(tmp_path / "incoming", classes=1, per_class=2, start_seed=960)
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    assert run_batch(config, progress=False).predicted == 2
    copy = data / "class0" / "copy.jpg"
    shutil.copy(data / "class0" / "img0.jpg", copy)
    real = StatMemo.ids
    monkeypatch.setattr(StatMemo, "ids", lambda memo, paths: [  # what hashing saw before the file was overwritten
        "0" * 16 if p == str(copy) else i for (p, _stat), i in zip(paths, real(memo, paths), strict=True)])
    entry = run_batch(config, progress=False)
    assert (entry.new, entry.predicted) == (1, 0)
    assert len(_by_image(_rows(tmp_path / "batch"))) == 2


@pytest.mark.parametrize("change,message", [
    ({"ouput_dir": "x"}, "unknown key 'ouput_dir'"),
    ({"log": None}, "'log' is required"),
    ({"inputs": ["nowhere"]}, r"'inputs\[0\]': folder or file list not found"),
    ({"features": {"backbones": ["resnet18"]}}, "'features.backbones' does not apply to batch runs"),
    ({"features": {"batch_size": 0}}, "'features.batch_size' must be a positive integer"),
    ({"heads": ["missing.skops"]}, "'heads.missing': head file not found"),
    ({"heads": {}}, "'heads' must be"),
    ({"chunk_size": "big"}, "'chunk_size' must be a positive integer"),
])
def test_bad_batch_configs_are_refused_before_any_work(tmp_path, heads, capsys, change, message):
    config = _config(tmp_path, [make_folder(tmp_path / "in", classes=1, per_class=1)], {"lr": heads / "lr.skops"})
    raw = json.loads(config.read_text())
    raw.update(change)
    config.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    assert main(["batch", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err and re.search(message, err)
    assert not (tmp_path / "batch").exists()


def test_a_busy_lock_exits_with_code_4_or_waits(tmp_path, heads, capsys, caplog):
    data = make_folder(tmp_path / "incoming", classes=1, per_class=2, start_seed=950)
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    lock = tmp_path / "batch" / "predictions" / LOCK_NAME
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("pid 1 on elsewhere since earlier\n")
        holder.flush()
        assert main(["batch", str(config), "--on-lock", "exit", "--quiet"]) == 4
        assert "another batch run (pid 1 on elsewhere since earlier) holds" in capsys.readouterr().err
        assert not (tmp_path / "batch" / "runs.jsonl").exists()
        waiting = threading.Thread(target=run_batch, args=(config,), kwargs={"progress": False})
        waiting.start()

        def queued() -> bool:  # the run logs that it waits just before it blocks on the lock
            assert waiting.is_alive(), "the second run ended instead of waiting for the lock"
            return "waiting for the batch run that holds" in caplog.text
        _wait_for(queued, "the second run to queue for the lock", timeout=60)
        assert "pid 1 on elsewhere since earlier" in caplog.text
        assert waiting.is_alive() and not (tmp_path / "batch" / "runs.jsonl").exists()
    waiting.join(timeout=120)
    assert not waiting.is_alive() and [e["predicted"] for e in read_log(tmp_path / "batch" / "runs.jsonl")] == [2]


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "batch", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.slow
def test_two_concurrent_runs_leave_one_consistent_result(tmp_path, heads):
    data = make_folder(tmp_path / "incoming", classes=3, per_class=8, start_seed=1000)
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"})
    runs = [_cli(config), _cli(config)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sorted(e["predicted"] for e in read_log(tmp_path / "batch" / "runs.jsonl")) == [0, 24]
    assert len(_by_image(_rows(tmp_path / "batch"))) == 24


@pytest.mark.slow
def test_runs_killed_mid_way_then_rerun_match_an_uninterrupted_run(tmp_path, heads):
    data = make_folder(tmp_path / "incoming", classes=4, per_class=30, start_seed=2000)
    both = {"lr": heads / "lr.skops", "knn": heads / "knn.skops"}
    options = {"shard_size": 2, "batch_size": 2}  # 60 shards per head: the tiny backbone leaves the kills time
    config = _config(tmp_path, [data], both, **options)
    cache = tmp_path / "batch" / "cache"

    first = _cli(config)  # killed during the first head's extraction
    _wait_for(lambda: len(list(cache.glob("*/shards/*.json"))) >= 3, "the first shards")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert 0 < len(list(cache.glob("*/shards/*.json"))) < 60, "the kill did not land mid-extraction"
    second = _cli(config)  # killed after committing the lr file, while the knn head extracts
    _wait_for(lambda: list((tmp_path / "batch" / "predictions" / "lr").glob("run-*.csv")), "the lr file")
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    assert not list((tmp_path / "batch" / "predictions" / "knn").glob("run-*.csv")), "the kill came too late"
    third = _cli(config)
    assert third.wait(timeout=300) == 0, third.communicate()[0]

    clean = run_batch(_config(tmp_path, [data], both, name="clean", **options), progress=False)
    assert clean.predicted == 240
    assert _by_image(_rows(tmp_path / "batch")) == _by_image(_rows(tmp_path / "clean"))
    log = read_log(tmp_path / "batch" / "runs.jsonl")
    assert [(e["status"], e["predicted"]) for e in log] == [("recovered", 120), ("ok", 120)]
    assert log[0].keys() == log[1].keys() and list(log[0]["heads"]) == ["lr"] and log[0]["exit_code"] is None
    for store in FeatureStore.all_in(cache):
        assert store.verify() == []


@pytest.fixture
def restored_environ():
    """distributed's LocalCluster writes OMP_NUM_THREADS=1 (and friends) into this process's environment for
    its workers and leaves it there; later tests' subprocesses would inherit one-thread numerics."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_a_cluster_worker_killed_during_extraction_still_gives_correct_features(tmp_path, heads, restored_environ):
    from distributed import Client, LocalCluster

    data = make_folder(tmp_path / "incoming", classes=3, per_class=32, start_seed=3000)
    options = {"shard_size": 2, "batch_size": 2}  # 48 shards: some still to run when the first is done
    config = _config(tmp_path, [data], {"lr": heads / "lr.skops"}, **options)
    cache = tmp_path / "batch" / "cache"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        run = _cli(config, "--scheduler", cluster.scheduler_address)
        _wait_for(lambda: list(cache.glob("*/shards/*.json")), "the first shard")
        busy = [worker for worker, tasks in client.processing().items() if tasks and worker in pids]
        assert busy, "no worker was running a shard"
        os.kill(pids[busy[0]], signal.SIGKILL)
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out
        assert pids[busy[0]] not in client.run(os.getpid).values()  # the nanny started a new worker

    clean = run_batch(_config(tmp_path, [data], {"lr": heads / "lr.skops"}, name="clean", **options), progress=False)
    assert clean.predicted == 96
    assert _by_image(_rows(tmp_path / "batch")) == _by_image(_rows(tmp_path / "clean"))
    cluster_report = extract(data, TINY, cache_dir=cache, progress=False, **options)
    clean_report = extract(data, TINY, cache_dir=tmp_path / "clean" / "cache", progress=False, **options)
    assert cluster_report.computed == clean_report.computed == 0
    (cluster_fs,), (clean_fs,) = cluster_report.feature_sets.values(), clean_report.feature_sets.values()
    assert np.array_equal(cluster_fs.features.compute(), clean_fs.features.compute())
    (store,) = FeatureStore.all_in(cache)
    assert store.verify() == [] and len(store.index()) == 96


def test_the_example_batch_config_is_valid_once_its_folder_and_head_exist(tmp_path, heads):
    """configs/batch.yaml, copied beside an inputs folder and a head file, loads as it stands."""
    import yaml

    from pipeline.app.batch import load_batch_config

    example = Path(__file__).resolve().parents[1] / "configs" / "batch.yaml"
    raw = yaml.safe_load(example.read_text())
    (tmp_path / "incoming").mkdir()
    head = tmp_path / "runs/flowers/heads/logreg.skops"
    head.parent.mkdir(parents=True)
    shutil.copy(heads / "lr.skops", head)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/batch.yaml").write_text(example.read_text())
    config = load_batch_config(tmp_path / "configs/batch.yaml")
    assert config.heads == {"logreg": tmp_path / "configs/../runs/flowers/heads/logreg.skops"}
    assert config.output_dir == tmp_path / "configs" / raw["output_dir"] and config.chunk_size == raw["chunk_size"]
    assert config.log == tmp_path / "configs/../runs/batch/runs.jsonl"
    assert config.features.cache_dir == str(tmp_path / "configs/../cache")
