"""The command line as a user meets it: summaries, one-line errors, cache maintenance."""

import subprocess
import sys

import pytest

from pipeline.cli.main import main

from .conftest import TINY


def test_extract_prints_a_summary_and_writes_the_skip_list(tiny_folder, cache_dir, capsys):
    (tiny_folder / "class0" / "notes.txt").write_text("not an image")
    assert main(["extract", "--data", str(tiny_folder), "--backbone", TINY, "--cache", str(cache_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "images: 13 | rows computed: 12 | rows reused: 0 | files skipped: 1" in out
    assert "notes.txt: not an image" in out
    assert (cache_dir / "skipped.csv").read_text().splitlines()[1].endswith("not an image (unknown format)")
    assert main(["extract", "--data", str(tiny_folder), "--backbone", TINY, "--cache", str(cache_dir), "--quiet"]) == 0
    assert "rows computed: 0 | rows reused: 12" in capsys.readouterr().out


def test_cache_ls_verify_gc(tiny_folder, cache_dir, capsys):
    main(["extract", "--data", str(tiny_folder), "--backbone", TINY, "--cache", str(cache_dir), "--quiet",
          "--shard-size", "5"])
    capsys.readouterr()
    assert main(["cache", "ls", "--cache", str(cache_dir)]) == 0
    listing = capsys.readouterr().out
    assert TINY in listing and " 12 " in listing and "KB" in listing
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 0
    assert "checked 3 shards in 1 caches: OK" in capsys.readouterr().out
    record = next(cache_dir.glob("*/shards/*.json"))
    record.write_text("{broken")
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 1
    assert "completion record is unreadable" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache", str(cache_dir)]) == 0
    assert "unreadable record" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", str(cache_dir)]) == 0


@pytest.mark.parametrize("argv,message", [
    (["extract", "--data", "/no/such/folder"], "data folder or file list not found: /no/such/folder"),
    (["extract", "--data", ".", "--backbone", "resnet9000"], "unknown backbone 'resnet9000'"),
    (["extract", "--data", ".", "--layer", "stage99"], "no layer 'stage99'"),
    (["extract"], "nothing to extract"),
    (["cache", "ls", "--cache", "/no/such/cache"], "cache folder not found"),
])
def test_user_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bad_config_names_the_file_and_the_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: {train: .}\nfeatures: {backbones: [efficientnet_lite0], batch_sise: 8}\n")
    assert main(["extract", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "'features.batch_sise'" in err and "batch_size" in err
    config.write_text("data: {train: .}\nfeatures: {batch_size: many}\n")
    assert main(["extract", "--config", str(config)]) == 2
    assert "'features.batch_size' must be a positive integer, got 'many'" in capsys.readouterr().err
    config.write_text("data: {train: missing}\n")
    assert main(["extract", "--config", str(config)]) == 2
    assert "'data.train': folder not found" in capsys.readouterr().err


def test_config_extracts_every_split(tmp_path, tiny_folder, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{train: {tiny_folder}, test: {tiny_folder / 'class1'}}}\n"
                      f"features: {{backbones: [{TINY}], cache_dir: {tmp_path / 'c'}, batch_size: 4}}\n")
    assert main(["extract", "--config", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "== train" in out and "== test" in out and "rows computed: 0 | rows reused: 4" in out


def test_console_script_help_and_backbones():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--help"], capture_output=True,
                            text=True, check=True)
    assert "--scheduler" in result.stdout and "--precision" in result.stdout
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "backbones"], capture_output=True, text=True,
                            check=True)
    assert "efficientnet_lite0" in result.stdout and "head:1280*" in result.stdout
    # a backbone registered by a plugin (PIPELINE_PLUGINS, set by conftest) is known in a fresh process
    assert f"{TINY}\n  tests/tinynet.py" in result.stdout and "head:64*" in result.stdout
