"""Deploying a saved head: one ONNX model from images to probabilities, and a prediction server."""
