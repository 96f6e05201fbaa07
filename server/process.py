"""Child-process helpers shared by engines and jobs."""

from __future__ import annotations

import contextlib
import ctypes
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when the gateway dies, even by SIGKILL
    (Linux prctl; a no-op elsewhere). The gateway's own shutdown stops children first; this
    covers the crash that skips it."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)

    return preexec
