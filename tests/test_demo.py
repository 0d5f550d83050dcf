import pytest

from pipeline.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_bundled_digits(tmp_path, capsys):
    assert main(["demo", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: images: 1347 | rows computed: 1347" in out
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 90.0, out
