"""The `pipeline` command: parses arguments, calls the app layer, prints. Nothing else."""
