"""Latency-budget routing: pure policy. Filters -> scorers -> picker over frozen snapshots."""
