"""Fault injection: ``kill -9`` of the whole ``dvc repro`` process group at random moments.

    PYTHONPATH=. python benchmarks/fault_kill9.py --seeds 10 [--out kill9.json]

One uninterrupted ``dvc repro`` of a tiny config (2 torchrun processes) in a fresh git + DVC
repository gives the reference outputs and the run time T. Then, for each seed, a fresh
repository runs ``dvc repro`` in a process group of its own, which is killed with SIGKILL at a
random moment in [0.2 T, 0.95 T] (during train, sample or evaluate; the stage running is
recorded). The script then checks that

1. no process is left running in the repository (torchrun workers die with their launcher,
   :mod:`pipeline.guard`), measuring how long the last one took to go;
2. a second ``dvc repro`` exits 0;
3. its outputs are identical to the reference: the DVC hashes of the data, the models
   (``runs/train/model.pt`` bit-exact after a resume), the samples and the grid, and the FID.

Takes about 1-2 minutes per seed on 2 CPU cores; not part of ``make test``. Results:
``benchmarks/results/fault_kill9.md``, one section per machine and command line (a rerun
replaces its own section); ``--out`` also writes every run's record as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import yaml
from _results import RESULTS, command, machine, table, write_section

REPO = Path(__file__).resolve().parents[1]
PAGE = RESULTS / "fault_kill9.md"
TITLE = "Fault injection: kill -9 of dvc repro at a random moment"
INTRO = """Written by `python benchmarks/fault_kill9.py`, one section per machine and command line;
a rerun replaces its own section. A tiny configuration (2 torchrun workers, 80 training steps)
runs `dvc repro` once uninterrupted in a fresh repository (the reference), then once per seed in
another fresh repository whose whole process group gets SIGKILL at a random moment in
[0.2 T, 0.95 T]; then `dvc repro` again. A run is ok when no process is left in its
repository and the re-run exits 0 with outputs bit-identical to the reference (`EXACT` in the
script, the prepared tensors, the FID)."""

sys.path.insert(0, str(REPO / "tests" / "pipeline"))
from _pipeline_helpers import tiny_raw  # noqa: E402
from test_e2e import make_repo  # noqa: E402

from pipeline.files import file_digest  # noqa: E402

# Outputs that must be bit-identical to the uninterrupted run (their md5 in dvc.lock).
# (data/prepared is compared by its two tensors, below.)
EXACT = (
    "models/classifier.pt",
    "models/reference_features.pt",
    "runs/train/model.pt",
    "runs/samples/ddim5",
    "reports/grids/ddim5.png",
)


def raw_params() -> dict[str, Any]:
    raw = tiny_raw()
    raw["train"].update(nproc=2, steps=80, checkpoint_every=10, log_every=10)
    raw["sample"].update(n_images=40, batch_size=10)
    return raw


def lock_hashes(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            found[out["path"]] = out["md5"]
    hashes = {p: found.get(p, "missing") for p in EXACT}
    for name in ("train.pt", "test.pt"):
        hashes[f"data/prepared/{name}"] = file_digest(root / "data/prepared" / name)
    return hashes


def fid(root: Path) -> Any:
    record = json.loads((root / "metrics/eval/ddim5.json").read_text())
    return {k: v for k, v in record.items() if k.startswith("fid")}


def processes_in(root: Path) -> list[int]:
    """PIDs of processes whose working directory is inside ``root``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == str(root) or cwd.startswith(str(root) + "/"):
            pids.append(int(entry.name))
    return pids


def repro(root: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=root,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, killed as a whole
    )


def current_stage(log: Path) -> str:
    stages = [ln.split("'")[1] for ln in log.read_text().splitlines() if "Running stage" in ln]
    return stages[-1] if stages else "(none)"


def page_body(summary: dict[str, Any]) -> str:
    """The results page's section of one invocation: a summary line and a row per run."""
    runs = summary["runs"]
    stages: dict[str, int] = {}
    for r in runs:
        stages[r["stage"]] = stages.get(r["stage"], 0) + 1
    where = ", ".join(f"{stage} {count}" for stage, count in stages.items())
    lines = [f"Reference run {summary['reference_s']} s; {len(runs)} interrupted runs (killed in: "
             f"{where}); {sum(r['identical'] for r in runs)}/{len(runs)} identical after the "
             f"re-run; all ok: {summary['all_ok']}.", ""]
    keys = ["seed", "killed_after_s", "stage", "orphans_left", "last_process_gone_s",
            "rerun_exit", "identical", "orphans_after_rerun"]
    lines += table(keys, [{**r, "orphans_left": len(r["orphans_left"]),
                           "orphans_after_rerun": len(r["orphans_after_rerun"])} for r in runs])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="interrupted runs (seeds 0..N-1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the records as JSON here")
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    with TemporaryDirectory(prefix="kill9-") as tmp:
        ref = Path(tmp) / "ref"
        ref.mkdir()
        env = make_repo(ref, raw_params())
        start = time.monotonic()
        rc = repro(ref, env, ref / "repro.log").wait()
        total = time.monotonic() - start
        if rc != 0:
            print((ref / "repro.log").read_text())
            return 1
        reference, ref_fid = lock_hashes(ref), fid(ref)
        print(f"reference run: {total:.1f} s, fid {ref_fid}", flush=True)
        for seed in range(args.seeds):
            rng = random.Random(seed)
            root = Path(tmp) / f"seed{seed}"
            root.mkdir()
            env = make_repo(root, raw_params())
            delay = rng.uniform(0.2, 0.95) * total
            proc = repro(root, env, root / "killed.log")
            time.sleep(delay)
            stage = current_stage(root / "killed.log")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            left = processes_in(root)
            while left and time.monotonic() - killed_at < 120:
                time.sleep(0.5)
                left = processes_in(root)
            gone_s = time.monotonic() - killed_at
            rc = repro(root, env, root / "rerun.log").wait()
            same = rc == 0 and lock_hashes(root) == reference and fid(root) == ref_fid
            row = {
                "seed": seed,
                "killed_after_s": round(delay, 1),
                "stage": stage,
                "orphans_left": left,
                "last_process_gone_s": round(gone_s, 1),
                "rerun_exit": rc,
                "identical": same,
                "orphans_after_rerun": processes_in(root),
            }
            if not same and rc == 0:
                row["diff"] = {
                    k: v for k, v in lock_hashes(root).items() if reference[k] != v
                }
            if rc != 0:
                row["rerun_log"] = (root / "rerun.log").read_text()[-2000:]
            results.append(row)
            print(json.dumps(row), flush=True)
    ok = all(
        r["identical"] and not r["orphans_left"] and not r["orphans_after_rerun"] for r in results
    )
    summary = {"reference_s": round(total, 1), "runs": results, "all_ok": ok}
    write_section(PAGE, TITLE, INTRO, f"{machine()}: `{command()}`", page_body(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{sum(r['identical'] for r in results)}/{len(results)} identical, all ok: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
