"""Shared infrastructure: the settings tree, model loading and Qdrant access."""
