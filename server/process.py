"""Child-process helpers shared by engines and jobs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Mapping

_PR_SET_PDEATHSIG = 1
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gateway's environment for an engine or a job, less its secrets: no `QUANTGATE_*` variable that
    names a key, token, secret or password (QUANTGATE_API_KEYS, QUANTGATE_ADMIN_KEY) reaches a child,
    so nothing that runs there (an engine's plugins, a model's code, a calibration) can read them."""
    env = {name: value for name, value in os.environ.items()
           if not (name.startswith("QUANTGATE_") and any(word in name for word in _SECRET_WORDS))}  # fmt: skip
    env.update(extra or {})
    return env


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when the gateway dies, even by SIGKILL
    (Linux prctl; a no-op elsewhere). The gateway's own shutdown stops children first; this
    covers the crash that skips it."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)

    return preexec
