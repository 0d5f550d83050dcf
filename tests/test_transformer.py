import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from pipeline import FeatureExtractor
from pipeline.core.errors import BackboneError, DataError
from pipeline.features.extract import extract

from .conftest import TINY, TINY_DIMS


def test_extractor_in_a_sklearn_pipeline_uses_the_cache(tiny_folder, cache_dir):
    paths = sorted(str(p) for p in tiny_folder.rglob("*.jpg"))
    labels = [p.split("/")[-2] for p in paths]
    model = make_pipeline(FeatureExtractor(TINY, cache_dir=str(cache_dir)), LogisticRegression(max_iter=500))
    model.fit(paths, labels)
    assert model.score(paths, labels) == 1.0
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    assert report.computed == 0 and report.reused == 12
    step = model[0]
    dim = TINY_DIMS["head"]
    assert step.n_features_out_ == dim and step.get_feature_names_out()[0] == f"{TINY}_head_0"
    direct = step.transform(paths[:3])
    assert direct.shape == (3, dim) and np.isfinite(direct).all()


def test_extractor_follows_the_estimator_contract(tmp_path):
    extractor = FeatureExtractor(backbone="efficientnet_lite0", layer="stage4", cache_dir=str(tmp_path))
    assert clone(extractor).get_params()["layer"] == "stage4"
    assert not hasattr(extractor, "layer_")
    with pytest.raises(BackboneError):
        FeatureExtractor(backbone="nope").fit()


def test_extractor_refuses_files_it_cannot_embed(tmp_path, tiny_folder):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="cannot embed 1 of 2 files"):
        FeatureExtractor(TINY, cache_dir=str(tmp_path / "c")).fit().transform(
            [str(next(tiny_folder.rglob("*.jpg"))), bad])
