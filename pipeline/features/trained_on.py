"""Fine-tuned backbones and the images that trained them.

A backbone saved by `pipeline finetune` lists the content ids of the images its network was trained on
(`models.weights.TRAINED_ON`, beside its manifest). The network was trained to separate exactly those
images, so a head's cross-validated score on their features is optimistic, and so is every setting that
score chooses: on intel6 a logistic regression on a fine-tuned twin scored 95.7% in CV on its training
folder against 90.7% on the test folder (docs/guide/finetune.md). `warn_trained_on` says so, once per
backbone, with how many of the images are shared.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pipeline.features.extract import FeatureSet
from pipeline.models.registry import BackboneSpec, get_spec

logger = logging.getLogger(__name__)


def trained_on(spec: BackboneSpec) -> frozenset[str]:
    """The content ids of the images that trained `spec`'s network; empty for one that was not fine-tuned
    (or saved before the list was kept)."""
    if spec.trained_on is None:
        return frozenset()
    try:
        return frozenset(spec.trained_on.read_text().split())
    except OSError as exc:
        logger.warning(f"warning: cannot read {spec.trained_on} ({exc.strerror or exc}): whether backbone "
                       f"{spec.name!r} was trained on these images is unknown")
        return frozenset()


FITTED = "scores on them (cross-validation, LogME) are optimistic, and so are the settings those scores choose"
SCORE_HEADS = "score the head on images the network never saw (pipeline evaluate)"
TESTED = "a test score on them is optimistic"
TEST_ELSEWHERE = "test on images the network never saw"


def warn_trained_on(feature_sets: Iterable[FeatureSet], what: str, consequence: str = FITTED,
                    advice: str = SCORE_HEADS) -> dict[str, int]:
    """Warn, per backbone, when images of `what` (e.g. "--data train/") trained its network: what follows
    (`consequence`) and what to do (`advice`); returns how many did, by backbone (only those with any)."""
    shared: dict[str, int] = {}
    seen: set[str] = set()
    for fs in feature_sets:
        if fs.backbone in seen:
            continue
        seen.add(fs.backbone)
        ids = trained_on(get_spec(fs.backbone))
        count = sum(image_id in ids for image_id in fs.image_ids) if ids else 0
        if count:
            shared[fs.backbone] = count
            logger.warning(f"warning: {count} of the {len(fs.image_ids)} images of {what} trained backbone "
                           f"{fs.backbone!r} (pipeline finetune): {consequence}; {advice}")
    return shared
