"""Model sources: the bundled default checkpoint and (later) the registry's ingest."""
