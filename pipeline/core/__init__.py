"""The bottom layer: the error hierarchy, durable file writes, file hashing and shared names.

Imports nothing else of the package."""
