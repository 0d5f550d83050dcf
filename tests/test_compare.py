"""Transfer vs. scratch with the tiny test backbone on tiny generated images (a few steps each)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pipeline.app.stage3 import run_compare
from pipeline.cli.main import main
from pipeline.core.errors import ConfigError
from pipeline.tuning.compare import CompareOptions, kshot_rows, parse_shots

from .conftest import TINY, make_folder, stage_run_config


def test_kshot_draws_are_stratified_seeded_and_nested_in_the_classes():
    labels = np.repeat([0, 1, 2], [5, 3, 7])
    rows = kshot_rows(labels, 2, seed=0)
    assert np.bincount(labels[rows]).tolist() == [2, 2, 2]
    assert np.array_equal(rows, kshot_rows(labels, 2, seed=0))
    assert not all(np.array_equal(rows, kshot_rows(labels, 2, seed=s)) for s in range(1, 6))
    assert np.array_equal(kshot_rows(labels, None, seed=3), np.arange(15))
    assert np.bincount(labels[kshot_rows(labels, 4, seed=1)]).tolist() == [4, 3, 4]  # a class with fewer: all of it
    assert parse_shots("1, 5,all") == [1, 5, None]
    for bad in ("0", "x", "1,,2"):
        with pytest.raises(ConfigError, match="shots"):
            parse_shots(bad)


def test_compare_writes_json_figure_and_report_for_every_method_and_shot(tmp_path):
    make_folder(tmp_path / "train", classes=3, per_class=4)
    make_folder(tmp_path / "test", classes=3, per_class=2, start_seed=100)
    out = tmp_path / "out"
    started = time.perf_counter()
    result = run_compare(CompareOptions(tmp_path / "train", tmp_path / "test", shots=[1, None], seeds=[0], batch_size=4,
                                    backbone=TINY, finetune_steps=2, scratch_steps=3, scratch_size=32,
                                    cache_dir=tmp_path / "cache", out=out, device="cpu"), progress=False)
    elapsed = time.perf_counter() - started
    saved = json.loads((out / "compare.json").read_text())
    assert saved == result
    cells = {(r["method"], r["shots"]): r for r in saved["runs"]}
    assert set(cells) == {(m, k) for m in ("linear probe", "fine-tuning", "from scratch") for k in (1, "all")}
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["seconds"] < elapsed for r in saved["runs"])
    assert sum(r["seconds"] for r in saved["runs"]) < elapsed
    assert cells[("fine-tuning", 1)]["images"] == 3 and cells[("from scratch", "all")]["images"] == 12
    assert (out / "compare.png").stat().st_size > 10_000
    assert "Transfer vs. scratch" in (out / "compare.html").read_text()


def test_cli_refuses_bad_compare_and_finetune_options_in_one_line(tmp_path, capsys):
    make_folder(tmp_path / "train", classes=2, per_class=2)
    assert main(["compare", "--data", str(tmp_path / "train"), "--test", str(tmp_path / "train"),
                 "--shots", "1,zero"]) == 2
    assert main(["finetune", "--data", str(tmp_path / "train"), "--unfreeze", "last:x",
                 "--out", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--shots" in errors[0] and "unfreeze must be" in errors[1]


def _run_config(tmp_path, compare_section: str):
    make_folder(tmp_path / "train", classes=3, per_class=4)
    make_folder(tmp_path / "test", classes=3, per_class=2, start_seed=100)
    return stage_run_config(tmp_path / "run.yaml", tmp_path, tmp_path / "cache", tmp_path / "out",
                            f"compare: {compare_section}")


@pytest.mark.parametrize(("section", "message"), [
    ("{shots: [1], sedes: [0]}", r"unknown key 'compare\.sedes'"),
    ("{shots: [0, all]}", r"'compare\.shots' must be a list of labelled images per class"),
    ("{seeds: one}", r"'compare\.seeds' must be a list of seeds, each an integer from 0 to"),
    ("{unfreeze: some}", r"'compare': unfreeze must be head, all or last:N"),
    ("{scratch_size: 8}", r"'compare': .*scratch input at least 16 px"),
    ("{backbone: resnet9000}", r"'compare': .*resnet9000"),
    ("[1, 5]", r"'compare' must be a mapping"),
])
def test_run_config_compare_section_is_checked_before_any_work(tmp_path, section, message):
    from pipeline.app.run import run

    path = _run_config(tmp_path, section)
    with pytest.raises(ConfigError, match=message) as info:
        run(path, progress=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_run_config_compare_section_adds_its_summary_to_metrics_and_report(tmp_path):
    from pipeline.app.run import run

    section = "{shots: [1, all], seeds: [0, 1], finetune_steps: 1, scratch_steps: 2, scratch_size: 32, batch_size: 4}"
    metrics = run(_run_config(tmp_path, section), progress=False)
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["compare"] == metrics["compare"]
    rows = {(r["method"], r["shots"]): r for r in metrics["compare"]["summary"]}
    assert set(rows) == {(m, k) for m in ("linear probe", "fine-tuning", "from scratch") for k in ("1", "all")}
    assert all(r["seeds"] == 2 and 0 <= r["accuracy"] <= 1 for r in rows.values())
    assert rows[("from scratch", "all")]["images"] == 12
    detail = json.loads((out / metrics["compare"]["results"]).read_text())
    assert len(detail["runs"]) == 3 * 2 * 2
    report = (out / "report.html").read_text()
    assert "Transfer vs. scratch" in report and 'href="compare/compare.png"' in report
    assert (out / "compare" / "compare.png").is_file()


def test_compare_prints_a_broken_training_image_and_lists_it_in_compare_json(tmp_path, capsys):
    make_folder(tmp_path / "train", classes=2, per_class=3)
    make_folder(tmp_path / "test", classes=2, per_class=2, start_seed=100)
    broken = tmp_path / "train" / "class1" / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["compare", "--data", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--shots", "1",
                 "--seeds", "0", "--backbone", TINY, "--finetune-steps", "1", "--scratch-steps", "1",
                 "--scratch-size", "32", "--cache", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {broken}: not an image (unknown format)" in printed
    assert json.loads((out / "compare.json").read_text())["skipped"] == [[str(broken), "not an image (unknown format)"]]
