"""Stage 1: the on-disk feature cache, extraction with Dask, and the scikit-learn FeatureExtractor."""
