"""Documents -> chunks -> embeddings -> Qdrant, incrementally. ``python -m ingest --help``."""
