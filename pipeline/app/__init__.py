"""Workflows a user runs: configs, `run`, `fit`, scheduled `batch` jobs and the demo."""
