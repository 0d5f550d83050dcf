"""Stage 2: classical heads on cached features: fitting, out-of-core fitting, saved bundles, prediction, ranking."""
