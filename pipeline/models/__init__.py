"""Models: the backbone registry (register, create, list by name), the networks, and their tap points."""
