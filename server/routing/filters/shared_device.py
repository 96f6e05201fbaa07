"""Keep a standby rung (another rung of its device is the active one: server/routing/concentrate.py)
only when taking the request costs nobody anything: its engine and its whole device are idle, and the
arrivals expected on the device while the request runs (the device's recent rate x its predicted
e2e) stay below `spill_max_overlap`. Every other candidate is kept."""

from __future__ import annotations

from pydantic import Field

from server.routing.plugin import PluginConfig
from server.routing.types import Candidate, RequestFeatures


class SharedDeviceFilter:
    name = "shared-device"

    class Config(PluginConfig):
        spill_max_overlap: float = Field(0.5, ge=0.0)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def keep(self, candidate: Candidate, features: RequestFeatures) -> bool:
        if not candidate.standby:
            return True
        if not candidate.load.idle or candidate.prediction is None:
            return False
        return candidate.device_rate_rps * candidate.prediction.e2e_ms / 1000 < self.config.spill_max_overlap
