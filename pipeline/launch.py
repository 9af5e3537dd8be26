"""``python -m pipeline.launch [--params P] -- CMD...``: run torchrun (CMD) like one command.

The train and sample stages' command in ``dvc.yaml``. It gives a torchrun job the behaviour of
a single ``diffusion`` command:

- ``--params``: validated first (as ``diffusion check-params``): a bad file is one line, exit 2,
  before any process starts.
- Exit codes: torchrun exits 1 whatever its workers returned; each worker writes the code it
  means to a status folder (:func:`pipeline.guard.record_exit`) and this launcher exits with it:
  2 bad parameters, 1 failure, 130/143 interrupted by SIGINT/SIGTERM.
- One process on one node (``--nproc-per-node=1``, the sample stage's default) runs the worker
  directly, without torchrun's ~3 s start (:func:`direct_command`).
- One line per problem: the workers' identical lines (one per rank) are printed once; torchrun's
  own log lines and its ``ChildFailedError``/``SignalException`` traceback are hidden
  (``DIFFUSION_DEBUG=1`` shows everything).
- Signals: torchrun runs in a process group of its own; SIGINT, SIGTERM and SIGHUP reaching this
  launcher (Ctrl-C in a terminal, ``dvc queue kill``, ``kill``) are forwarded to it once, and
  torchrun forwards them to the workers, which checkpoint and stop.
- No orphans: torchrun gets SIGTERM if this launcher dies (``kill -9``), and the workers get
  SIGTERM if torchrun dies (:func:`pipeline.guard.die_with_parent`).

Direct ``torchrun ... -m pipeline train`` (multi-node) keeps working without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from pipeline import guard

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# torchrun's own log lines: "W0515 12:00:00.123000 4242 torch/distributed/...] message"
TORCH_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
TRACEBACK = "Traceback (most recent call last):"


def _usage() -> int:
    print("usage: python -m pipeline.launch [--params FILE] -- COMMAND...", file=sys.stderr)
    return 2


def _validate(params_file: str) -> int:
    from pipeline.checks import check_buildable
    from pipeline.config import ParamsError, load_params

    try:
        check_buildable(load_params(params_file))
    except ParamsError as exc:
        text = str(exc)
        print(text if text.startswith(params_file) else f"{params_file}: {text}", file=sys.stderr)
        return 2
    return 0


class _Filter:
    """Copies the child's stderr to ours: once per distinct line, no torchrun noise."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.seen: set[str] = set()
        self.hidden: list[str] = []
        self.in_traceback = False

    def pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            if self.verbose:
                sys.stderr.write(line)
                sys.stderr.flush()
                continue
            if line.startswith(TRACEBACK):
                self.in_traceback = True  # torchrun's report: the rest of its output
            key = line.rstrip("\n")
            if self.in_traceback or TORCH_LOG.match(line) or key in self.seen:
                self.hidden.append(line)
                continue
            if key.strip():
                self.seen.add(key)
            sys.stderr.write(line)
            sys.stderr.flush()


def _exit_code(rc: int, signum: int | None, status_dir: Path) -> int:
    codes = []
    for f in status_dir.glob("rank-*"):
        try:
            codes.append(int(f.read_text().strip()))
        except (OSError, ValueError):
            continue
    if rc == 0 and not any(codes):
        return 0
    if signum is not None:
        return 128 + signum
    for wanted in (2, 130, 143):
        if wanted in codes:
            return wanted
    if any(codes):
        return 1
    if rc < 0:
        return 128 - rc
    return rc or 1


#: torchrun options a one-process, one-node job may carry and still run without torchrun
_SINGLE_OK = {"--standalone", "--nnodes=1", "--nproc-per-node=1", "--nproc_per_node=1"}


def direct_command(cmd: list[str]) -> list[str]:
    """``cmd`` without torchrun when it asks for ONE process on ONE node: ``python -m
    torch.distributed.run --standalone --nnodes=1 --nproc-per-node=1 -m MOD ARGS`` becomes
    ``python -m MOD ARGS``. torchrun's rendezvous and agent cost about 3 s per start, and a
    single worker without torchrun's variables is the same one-process run
    (:func:`diffusion_core.distributed.setup_distributed`). Any other command is returned as is."""
    try:
        at = cmd.index("torch.distributed.run")
    except ValueError:
        return cmd
    if at < 2 or cmd[at - 1] != "-m" or "-m" not in cmd[at + 1 :]:
        return cmd
    module_at = cmd.index("-m", at + 1)
    options = cmd[at + 1 : module_at]
    one = any(o in ("--nproc-per-node=1", "--nproc_per_node=1") for o in options)
    if not one or not set(options) <= _SINGLE_OK:
        return cmd
    return [*cmd[: at - 1], *cmd[module_at:]]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        return _usage()
    split = args.index("--")
    own, cmd = args[:split], args[split + 1 :]
    if not cmd or not (own == [] or (len(own) == 2 and own[0] == "--params")):
        return _usage()
    if own and (code := _validate(own[1])):
        return code

    cmd = direct_command(cmd)
    received: list[int] = []
    with tempfile.TemporaryDirectory(prefix="diffusion-status-") as status:
        env = dict(os.environ, **{guard.STATUS_DIR_ENV: status})

        def start() -> None:  # in the child, before exec
            os.setpgid(0, 0)  # Ctrl-C reaches torchrun once, through us
            guard.set_pdeathsig_in_child()

        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, preexec_fn=start)  # noqa: PLW1509

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        guard.die_with_parent()
        assert proc.stderr is not None
        filt = _Filter(guard.debug())
        pump = threading.Thread(target=filt.pump, args=(proc.stderr,), daemon=True)
        pump.start()
        rc = proc.wait()
        pump.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        code = _exit_code(rc, received[0] if received else None, Path(status))
    if code and not filt.seen and not filt.verbose:
        last = next((ln.strip() for ln in reversed(filt.hidden) if ln.strip()), "")
        print(
            f"error: {cmd[0]} exited with {rc}: {last[:200]} "
            f"({guard.DEBUG_ENV}=1 shows its full output)",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
