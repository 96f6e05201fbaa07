"""The model registry: SQLite metadata, a content-addressed artifact store, ingest, and the
builder that turns pending variants into served ones."""
