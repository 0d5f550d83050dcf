import json

import pytest

from pipeline.cli.main import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_bundled_digits(tmp_path, capsys):
    assert main(["demo", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["extract"] == {**metrics["extract"], "images": 1797, "computed": 1797, "skipped": 0}
    assert metrics["heads"]["logreg"]["accuracy"] > 0.9, out
    assert (tmp_path / "demo" / "report.html").is_file() and "report: " in out


def test_the_packaged_demo_config_is_the_one_in_configs():
    from .conftest import ROOT

    assert (ROOT / "configs" / "demo.yaml").read_text() == (ROOT / "pipeline" / "app" / "demo.yaml").read_text()
