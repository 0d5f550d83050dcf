"""The bottom layer: errors, durable file writes, file hashing, shared names. Imports nothing else of the package."""
