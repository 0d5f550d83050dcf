"""Hostile files: loading a saved head or a fine-tuning checkpoint never runs code (issue 17).

Each planted file carries a payload that, if it ever ran, would create a marker file; every test
asserts the marker is absent after the command. A pickle payload and a matching `.sha256` are what an
attacker who can write the head's folder would plant: the checksum catches accidents, not this.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io as sio
import torch

from pipeline.cli.main import main
from pipeline.core.hashing import file_sha256
from pipeline.features.sources import SourceMeta
from pipeline.heads.bundle import (
    LEGACY_TYPES,
    SCALARS_NOT_SEEN,
    TRUSTED_TYPES,
    BundleError,
    HeadBundle,
    HeadMetrics,
    load_bundle,
    save_bundle,
    types_in,
)
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec

from .conftest import TINY, make_folder


class Payload:
    """Unpickled, it calls `open(marker, "w")`: the marker file appears. Only `builtins.open` is named in
    the pickle, so the payload runs even where this test module cannot be imported."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Trap:
    """Built by skops (an ObjectNode: `__new__`, then `__setstate__`), it creates the marker file."""

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


def _write_sha256(path: Path) -> None:
    path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A labelled folder, its cache, and a logistic-regression head fitted on it by `pipeline fit`."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_folder(root / "data", classes=3, per_class=4)
    model = root / "lr.skops"
    assert main(["fit", "--data", str(data), "--backbone", TINY, "--type", "logistic_regression", "--out", str(model),
                 "--cache", str(root / "cache"), "--quiet"]) == 0
    return root, data, model


def _batch_config(folder: Path, data: Path, head: Path, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "batch.yaml"
    config.write_text(json.dumps({"inputs": [str(data)], "heads": {"h": str(head)}, "output_dir": str(folder / "out"),
                                  "log": str(folder / "runs.jsonl"),
                                  "features": {"cache_dir": str(data.parent / "cache")}, **options}))
    return config


def _command(name: str, model: Path, data: Path, folder: Path, *extra: str) -> list[str]:
    """`pipeline predict|evaluate|batch` with `model` on `data`; outputs go to `folder`, the cache is the
    `fitted` fixture's (beside `data`)."""
    cache = ["--cache", str(data.parent / "cache")]
    folder.mkdir(parents=True, exist_ok=True)
    if name == "predict":
        return ["predict", "--model", str(model), "--data", str(data), "--out", str(folder / "p.csv"), *cache,
                "--quiet", *extra]
    if name == "evaluate":
        return ["evaluate", "--model", str(model), "--data", str(data), *cache, "--quiet", *extra]
    return ["batch", str(_batch_config(folder, data, model)), "--quiet", *extra]


# --------------------------------------------------------------------------- pickled heads (format 1)

def test_the_payload_is_live(tmp_path):
    """The payload the tests below plant does run when unpickled: their absent marker means something."""
    marker = tmp_path / "ran"
    joblib.dump({"format": 1, "pipeline": Payload(marker)}, tmp_path / "evil.joblib")
    joblib.load(tmp_path / "evil.joblib")
    assert marker.exists()


@pytest.mark.parametrize("command", ["predict", "evaluate", "batch"])
def test_a_pickled_head_with_a_payload_is_refused_and_does_not_run(fitted, tmp_path, capsys, command):
    root, data, model = fitted
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.joblib"
    honest = load_bundle(model)
    joblib.dump({**honest.to_disk(), "pipeline": Payload(marker)}, evil)
    _write_sha256(evil)  # a matching checksum: what an attacker who can write the folder plants too
    assert main(_command(command, evil, data, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert f"{evil} is a pickle" in err and "re-fit the head" in err and "--trust-pickle" in err
    if command == "batch":
        assert "batch.yaml:" in err and "'heads.h'" in err and "trust_pickle: true" in err
        assert not (tmp_path / "runs.jsonl").exists()  # nothing ran, nothing was logged
    assert not marker.exists()


def test_a_pickle_named_like_a_safe_head_is_still_refused(fitted, tmp_path, capsys):
    """The content decides, not the name: a pickle renamed .skops is a pickle."""
    _root, data, _model = fitted
    marker, evil = tmp_path / "ran", tmp_path / "evil.skops"
    joblib.dump(Payload(marker), evil)
    _write_sha256(evil)
    assert main(_command("predict", evil, data, tmp_path)) == 2
    assert "is a pickle" in capsys.readouterr().err and not marker.exists()


def test_an_honest_old_head_loads_with_trust_pickle_and_predicts_identically(fitted, tmp_path, capsys):
    root, data, model = fitted
    old = tmp_path / "old.joblib"
    joblib.dump(load_bundle(model).to_disk(), old)  # what the earlier version wrote: format 1
    _write_sha256(old)

    assert main(_command("predict", model, data, tmp_path)) == 0
    expected = (tmp_path / "p.csv").read_bytes()
    assert main(_command("predict", old, data, tmp_path)) == 2
    assert main(_command("predict", old, data, tmp_path, "--trust-pickle")) == 0
    assert (tmp_path / "p.csv").read_bytes() == expected
    capsys.readouterr()
    assert main(_command("evaluate", model, data, tmp_path)) == 0
    assert main(_command("evaluate", old, data, tmp_path, "--trust-pickle")) == 0
    new_out, old_out = capsys.readouterr().out.splitlines()
    assert new_out.split(": ", 1)[1] == old_out.split(": ", 1)[1]  # same accuracy, macro-F1, images

    # batch: the flag, or the config key
    assert main(_command("batch", old, data, tmp_path / "flag", "--trust-pickle")) == 0
    trusting = _batch_config(tmp_path / "key", data, old, trust_pickle=True)
    assert main(["batch", str(trusting), "--quiet"]) == 0
    (flag_run,), (key_run,) = [list((tmp_path / d / "out" / "h").glob("run-*.csv")) for d in ("flag", "key")]
    flag_rows, key_rows = ([line.split(",", 3)[3] for line in run.read_text().splitlines()[1:]]  # from path on
                           for run in (flag_run, key_run))
    assert len(flag_rows) == 12 and flag_rows == key_rows

    # convert-head: only with --trust-pickle; the converted head needs no flag and predicts the same
    converted = tmp_path / "converted.skops"
    assert main(["convert-head", str(old), str(converted)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not converted.exists()
    assert main(["convert-head", str(old), str(converted), "--trust-pickle"]) == 0
    assert f"wrote {converted}" in capsys.readouterr().out
    assert zipfile.is_zipfile(converted) and (tmp_path / "converted.skops.sha256").is_file()
    assert main(_command("predict", converted, data, tmp_path)) == 0
    assert (tmp_path / "p.csv").read_bytes() == expected


# --------------------------------------------------------------------------- skops heads (format 2)

def _rewrite(model: Path, out: Path, schema_edit) -> Path:
    """`model` with its schema.json edited (its arrays and head.json kept), and a matching .sha256."""
    with zipfile.ZipFile(model) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    schema = json.loads(members["schema.json"])
    schema_edit(schema)
    members["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    _write_sha256(out)
    return out


def _without_ids(node: object) -> object:
    """A node from another skops file, without its memo ids (which could name objects of this one)."""
    if isinstance(node, dict):
        return {k: _without_ids(v) for k, v in node.items() if k not in ("__id__", "protocol", "_skops_version")}
    return [_without_ids(v) for v in node] if isinstance(node, list) else node


def _add_attribute(schema: dict, node: dict) -> None:
    """Give the Pipeline's last step (the classifier) one more attribute, holding `node`."""
    steps = schema["content"]["content"]["steps"]["content"]
    attributes = steps[-1]["content"][1]["content"]  # the classifier's attributes: a DictNode
    attributes["content"]["evil"] = _without_ids(node)
    attributes["key_types"]["content"].append({"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"})


def test_a_skops_head_with_an_untrusted_type_is_refused_naming_it(fitted, tmp_path, capsys):
    root, data, model = fitted
    marker = tmp_path / "ran"
    trap = Trap.__new__(Trap)
    trap.marker = str(marker)
    trap = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps(trap))).read("schema.json"))  # as skops writes it
    evil = _rewrite(model, tmp_path / "evil.skops", lambda schema: _add_attribute(schema, trap))
    with pytest.raises(BundleError, match=r"refusing to load type tests\.test_hostile_loading\.Trap, which is not"):
        load_bundle(evil)
    for command in ("predict", "evaluate", "batch"):
        assert main(_command(command, evil, data, tmp_path / command)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{evil}: refusing to load type tests.test_hostile_loading.Trap" in err
    assert not marker.exists()
    # the trap is live: trusting its type, skops builds it and the marker appears
    sio.load(evil, trusted=[*TRUSTED_TYPES, "tests.test_hostile_loading.Trap"])
    assert marker.exists()


def test_a_function_among_the_types_is_refused_too(fitted, tmp_path):
    """A function skops would merely look up (os.system) is a type outside the list like any other."""
    _root, _data, model = fitted
    node = {"__class__": "system", "__module__": "posix", "__loader__": "FunctionNode", "content": ""}
    evil = _rewrite(model, tmp_path / "evil.skops", lambda schema: _add_attribute(schema, node))
    with pytest.raises(BundleError, match=r"refusing to load type posix\.system"):
        load_bundle(evil)


def test_a_zip_without_head_json_or_with_a_pickle_inside_is_not_a_head(fitted, tmp_path):
    _root, _data, model = fitted
    marker = tmp_path / "ran"
    bare = tmp_path / "bare.skops"
    with zipfile.ZipFile(bare, "w") as archive:
        archive.writestr("schema.json", "{}")
        archive.writestr("head.pkl", pickle.dumps(Payload(marker)))
    _write_sha256(bare)
    with pytest.raises(BundleError, match="not a model bundle .*without head.json"):
        load_bundle(bare, trust_pickle=True)  # a zip archive is never unpickled, trusted or not
    assert not marker.exists()


def _fitted_pipelines() -> dict[str, object]:
    """Every kind of Pipeline our heads are: each head type and option that adds a step, in memory and out of
    core, with two and three classes."""
    import dask.array as da

    from pipeline.heads.outofcore import fit_incremental
    from pipeline.heads.zero_shot import ZeroShotClassifier

    rng = np.random.default_rng(0)
    pipelines = {}
    for classes in (2, 3):
        X, X2 = rng.normal(size=(60, 12)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)
        y = np.arange(60) % classes
        cases = [("logistic_regression", {}), ("logistic_regression", {"C": 1.0}), ("svm", {}),
                 ("svm", {"kernel": "linear", "C": 1.0}), ("knn", {}), ("knn", {"n_neighbors": 3}),
                 ("pca_fusion", {"components": 4, "variance_threshold": 0.0, "select_k": 3}),
                 ("pca_fusion", {"components": 4, "order": "concat_then_pca", "C": 1.0}),
                 ("logistic_regression", {"C": 1.0, "calibration": "isotonic", "class_weight": "balanced"}),
                 ("knn", {"n_neighbors": 3, "calibration": "sigmoid"}), ("svm", {"C": 1.0, "calibration": "none"}),
                 ("logistic_regression", {"C": 1.0, "calibration": "none"})]
        for i, (head_type, options) in enumerate(cases):
            spec = HeadSpec("h", head_type, ["a", "b"], {**HEAD_OPTIONS[head_type], **options})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence on random data is beside the point
                pipelines[f"{head_type}{i}/{classes}"] = fit_head(spec, np.hstack([X, X2]), y, [12, 8]).pipeline
        for head_type in ("logistic_regression", "pca_fusion"):
            spec = HeadSpec("h", head_type, ["a", "b"], {**HEAD_OPTIONS[head_type], "components": 4})
            sources = [da.from_array(X, chunks=20), da.from_array(X2, chunks=20)]
            pipelines[f"out_of_core_{head_type}/{classes}"] = fit_incremental(spec, sources, y, block_rows=20).pipeline
        # zero_shot and a logistic regression with a zero_shot_prior: class embeddings as plain arrays
        prior = ZeroShotClassifier(rng.normal(size=(classes, 20)), 100.0)
        for head_type, options in (("zero_shot", {}), ("logistic_regression", {"C": 1.0, "zero_shot_prior": 0.5})):
            spec = HeadSpec("h", head_type, ["a", "b"], {**HEAD_OPTIONS[head_type], **options})
            fitted = fit_head(spec, np.hstack([X, X2]), y, [12, 8], prior=prior)
            pipelines[f"{head_type}_prior/{classes}"] = fitted.pipeline
    return pipelines


def test_every_head_saves_loads_and_predicts_the_same_and_the_trusted_list_is_exact(tmp_path):
    """Each kind of head round-trips through the safe format; together they use every trusted type (but the
    numpy scalars kept for attributes that may hold one), and nothing else."""
    source = SourceMeta(backbone=TINY, layer="head", cache_key="k", precision="fp32", weights_sha256="")
    X = np.random.default_rng(1).normal(size=(9, 20)).astype(np.float32)
    used: set[str] = set()
    for name, pipeline in _fitted_pipelines().items():
        path = save_bundle(tmp_path / f"{name.replace('/', '_')}.skops", HeadBundle(
            pipeline=pipeline, classes=["a", "b", "c"], head=HeadSpec("h", "knn", [f"{TINY}:head"]), sources=[source],
            metrics=HeadMetrics(cv_accuracy=None, best_params={}, fit_seconds=0.0)))
        with zipfile.ZipFile(path) as archive:
            used |= types_in(json.loads(archive.read("schema.json")))
        np.testing.assert_array_equal(load_bundle(path).pipeline.predict_proba(X), pipeline.predict_proba(X),
                                      err_msg=name)
    assert used <= TRUSTED_TYPES
    assert TRUSTED_TYPES - used == {*SCALARS_NOT_SEEN, *LEGACY_TYPES}


def test_a_head_with_a_type_outside_the_list_is_not_saved(tmp_path):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    source = SourceMeta(backbone=TINY, layer="head", cache_key="k", precision="fp32", weights_sha256="")
    bundle = HeadBundle(pipeline=Pipeline([("f", FunctionTransformer())]), classes=[], sources=[source],
                        head=HeadSpec("h", "knn", [f"{TINY}:head"]),
                        metrics=HeadMetrics(cv_accuracy=None, best_params={}, fit_seconds=0.0))
    with pytest.raises(BundleError, match="refusing to save type sklearn.preprocessing._function_transformer"):
        save_bundle(tmp_path / "x.skops", bundle)
    assert not (tmp_path / "x.skops").exists()


# --------------------------------------------------------------------------- fine-tuning checkpoints

def _finetune(folder: Path, data: Path, cache: Path) -> list[str]:
    return ["finetune", "--data", str(data), "--backbone", TINY, "--unfreeze", "last:2", "--epochs", "1",
            "--batch-size", "4", "--probe-c", "1.0", "--device", "cpu", "--out", str(folder / "out"),
            "--name", "tiny_hostile", "--backbones-dir", str(folder / "backbones"), "--cache", str(cache),
            "--resume", "--quiet"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the plain pickle's protocol
@pytest.mark.parametrize("plant", ["torch.save", "pickle"])
def test_a_planted_checkpoint_is_refused_by_resume_and_does_not_run(fitted, tmp_path, capsys, plant):
    root, data, _model = fitted
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    payload = {"format": 2, "model": {"w": torch.zeros(2)}, "history": Payload(marker)}
    if plant == "torch.save":
        torch.save(payload, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(payload))
    assert main(_finetune(tmp_path, data, root / "cache")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {checkpoint} holds objects other than tensors" in err
    assert "start without --resume" in err
    assert not marker.exists()
    assert not (tmp_path / "backbones" / "tiny_hostile").exists()
    try:  # the payload is live: what the earlier loader did (a plain pickle runs, then fails torch's format check)
        torch.load(checkpoint, weights_only=False)
    except RuntimeError:
        assert plant == "pickle"
    assert marker.exists()


def test_a_checkpoint_of_the_earlier_format_is_refused(fitted, tmp_path, capsys):
    root, data, _model = fitted
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": {}, "history": [], "fingerprint": {}}, checkpoint)  # no "format": written before it
    assert main(_finetune(tmp_path, data, root / "cache")) == 2
    err = capsys.readouterr().err
    assert "written by an earlier version of the pipeline" in err and "start without --resume" in err


def test_a_checkpoint_is_written_with_tensors_and_plain_values_only():
    from pipeline.tuning.training import _plain

    plain = _plain({"best_val": np.float64(0.5), "history": [{"loss": 1.0}], "state": {"w": torch.zeros(2)},
                    "groups": [{"betas": (0.9, 0.999), "foreach": None}]})
    assert type(plain["best_val"]) is float and plain["groups"][0]["betas"] == (0.9, 0.999)
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]: a Generator cannot go into a weights-only"):
        _plain({"rng": np.random.default_rng(0)})
    with pytest.raises(TypeError, match="a ndarray cannot"):
        _plain({"x": np.zeros(2)})
