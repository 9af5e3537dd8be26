"""The results page of a benchmark tool: one Markdown page per tool, one section per machine and
command.

A tool calls :func:`write_section` with its page, the machine it ran on (:func:`machine`) and
its command line (:func:`command`). A rerun of the same command on the same machine replaces
that section; sections of other machines or other options stay, so one page holds every
measurement of its tool. Not a tool itself (no command line).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: object = None) -> str:
    """The GPU's name for a CUDA ``device``; else the CPU: model, core count, vector unit."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()})"


def command(drop: tuple[str, ...] = ("--out",)) -> str:
    """The command line of this run, as typed in the repository root, without the options in
    ``drop`` and their values (where a copy of the page goes does not change the measurement)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in drop:
            skip = True
        elif not any(arg.startswith(f"{name}=") for name in drop):
            args.append(arg)
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *args])


def read_sections(page: Path) -> dict[str, str]:
    """``{heading: body}`` of the ``## `` sections of ``page``, in order ({} if it is missing)."""
    if not page.is_file():
        return {}
    sections: dict[str, str] = {}
    heading, body, fenced = None, [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if line.startswith("## ") and not fenced:
            if heading is not None:
                sections[heading] = "\n".join(body).strip("\n")
            heading, body = line[3:].strip(), []
        elif heading is not None:
            body.append(line)
    if heading is not None:
        sections[heading] = "\n".join(body).strip("\n")
    return sections


def write_section(page: Path, title: str, intro: str, heading: str, body: str) -> Path:
    """Write ``page`` with ``title`` and ``intro`` and the section ``heading`` set to ``body``
    (replacing a section of the same heading, else appended after the others)."""
    sections = read_sections(page)
    sections[heading] = body.strip("\n")
    text = f"# {title}\n\n{intro.strip()}\n"
    text += "".join(f"\n## {h}\n\n{b}\n" for h, b in sections.items())
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def table(keys: list[str], rows: list[dict], header: list[str] | None = None) -> list[str]:
    """A Markdown table of ``rows`` (dicts) over ``keys``, as lines."""
    lines = ["| " + " | ".join(header or keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return lines
