"""Process hygiene for the stages: die with the launcher, report exit codes to it, debug mode.

- :func:`die_with_parent`: when the parent process dies (``kill -9`` of ``dvc repro``, of the
  launcher or of torchrun's agent) this process gets SIGTERM, stops after the current step with a
  checkpoint like on Ctrl-C, and is killed outright ``grace_s`` seconds later if it is still
  running (e.g. stuck in a collective with a dead peer). On Linux the kernel sends the SIGTERM
  (``prctl(PR_SET_PDEATHSIG)``); elsewhere, and as a back-up, a daemon thread polls the parent
  PID once a second. torchrun starts its workers in process groups of their own, so without this
  they would outlive a killed ``dvc repro``, keep training and race a re-run.
- :func:`record_exit`: under :mod:`pipeline.launch` each rank writes the exit code it means
  (2 bad parameters, 1 failure, 130/143 interrupted) to ``$DIFFUSION_STATUS_DIR/rank-<RANK>``,
  since torchrun itself exits 1 whatever its workers returned.
- :func:`debug`: ``DIFFUSION_DEBUG=1`` (or ``diffusion --debug``) shows tracebacks instead of the
  one-line messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
STATUS_DIR_ENV = "DIFFUSION_STATUS_DIR"
DEBUG_ENV = "DIFFUSION_DEBUG"
_armed = False


def debug() -> bool:
    """True when tracebacks are wanted (``DIFFUSION_DEBUG`` set to anything but ``0``/empty)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _set_pdeathsig(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_pdeathsig_in_child() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when its parent dies."""
    _set_pdeathsig(signal.SIGTERM)


def die_with_parent(grace_s: float = 60.0, poll_s: float = 1.0) -> None:
    """SIGTERM this process when its parent dies, SIGKILL it ``grace_s`` later (idempotent)."""
    global _armed
    if _armed:
        return
    _armed = True
    parent = os.getppid()
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), signal.SIGTERM)  # no-op if the kernel already sent it
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def record_exit(code: int) -> None:
    """Tell :mod:`pipeline.launch` (if it started this process) which exit code this rank means."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError):
        (Path(folder) / f"rank-{rank}").write_text(f"{code}\n")
