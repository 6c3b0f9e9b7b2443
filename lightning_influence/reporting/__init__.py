"""Sinks for influence results: plots, files on disk, W&B and other Lightning loggers."""
