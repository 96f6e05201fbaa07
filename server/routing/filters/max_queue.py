"""Keep engines whose queue (requests running and waiting, or the gateway's own in-flight count
when fresher) is at most `max_queue`, and whose KV cache is at most `max_kv_usage` full: llm-d's
low-queue and KV-utilisation filters. Off by default; put it in the `preferred` stage, where a rung
with a long queue is passed over while another has room and every rung is kept when none has."""

from __future__ import annotations

from pydantic import Field

from server.routing.plugin import PluginConfig
from server.routing.types import Candidate, RequestFeatures


class MaxQueueFilter:
    name = "max-queue"

    class Config(PluginConfig):
        max_queue: int = Field(128, ge=0, le=1_000_000, description="most requests ahead of a new one")
        max_kv_usage: float = Field(1.0, ge=0.0, le=1.0, description="most KV cache in use, as a fraction")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def keep(self, candidate: Candidate, features: RequestFeatures) -> bool:
        load = candidate.load
        return load.queue <= self.config.max_queue and load.kv_usage <= self.config.max_kv_usage
