"""A GGUF registration answers at once and converts in the background (the hardening issue: it used to
hold the admin request for the whole conversion); deleting the model mid-conversion stops it.

No engine: the model is deleted while its base is still `converting`, so this runs in the fast tier.
"""

from __future__ import annotations

import shutil
import time

import psutil
from fastapi.testclient import TestClient

from server.app import create_app
from server.models.embedded import find_bundled_gguf, gguf_checkpoint_dir, sha256_file
from server.settings import Settings
from tests.integration.drills import record
from tests.integration.gateway_process import ADMIN_KEY, TEST_HOME, wait_for

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_gguf_registration_answers_before_converting_and_delete_stops_the_conversion(tmp_path) -> None:
    home = tmp_path / "home"
    if (TEST_HOME / "cache").is_dir():  # vLLM's architecture list, asked once per vLLM version (~10 s)
        shutil.copytree(TEST_HOME / "cache", home / "cache")
    settings = Settings(home=home, embedded_model=False, admin_key=ADMIN_KEY, default_variants=("int8",))
    gguf = find_bundled_gguf()
    target = gguf_checkpoint_dir(settings.checkpoints_dir, sha256_file(gguf))
    with TestClient(create_app(settings)) as http:
        started = time.monotonic()
        response = http.post("/admin/models", json={"path": str(gguf), "name": "smol"}, headers=AUTH)
        answered_s = time.monotonic() - started
        assert response.status_code == 202, response.text
        # Registered from the GGUF's metadata alone: nothing converted yet when the 202 came.
        assert not (target / "config.json").exists(), f"converted inside the request ({answered_s:.1f} s)"
        assert response.json()["architecture"] == "LlamaForCausalLM"
        base = next(v for v in response.json()["variants"] if v["name"] == "bf16")
        assert base["state"] in ("pending", "converting")

        def states() -> dict[str, str]:
            model = http.get("/admin/models/smol", headers=AUTH).json()
            return {v["name"]: v["state"] for v in model["variants"]}

        def converting_pid() -> int | None:
            model = http.get("/admin/models/smol", headers=AUTH).json()
            base = next(v for v in model["variants"] if v["name"] == "bf16")
            if base["state"] != "converting" or not base["jobs"]:
                return None
            return http.get(f"/admin/jobs/{base['jobs'][0]}", headers=AUTH).json()["pid"]

        assert wait_for(lambda: converting_pid() is not None, 60, 0.1), states()
        pid = converting_pid()
        job = http.get("/admin/models/smol", headers=AUTH).json()["variants"][0]["jobs"][0]
        assert http.get(f"/admin/jobs/{job}", headers=AUTH).json()["stage"] == "converting"
        assert psutil.pid_exists(pid)
        # int8 waits for the checkpoint the conversion writes (its compression starts from it).
        assert states() == {"bf16": "converting", "int8": "pending"}

        assert http.delete("/admin/models/smol", headers=AUTH).status_code == 200
        deleted = time.monotonic()
        def gone() -> bool:
            return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

        assert wait_for(gone, 10, 0.05), f"the conversion ({pid}) outlived its model's deletion"
        record("GGUF registration, then DELETE mid-conversion", answered_s=round(answered_s, 2),
               conversion_gone_s=round(time.monotonic() - deleted, 2), half_checkpoint_left=0)
        assert not target.exists() and not list(settings.checkpoints_dir.glob(".gguf-*.*/")), \
            list(settings.checkpoints_dir.iterdir())
        assert http.get("/admin/models", headers=AUTH).json() == {"models": []}
        assert http.get("/health").status_code == 200
