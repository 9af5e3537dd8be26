"""What a user sees in the browser, checked in headless Chromium (Debian's ``chromium``).

* ``dvc plots show`` writes ``dvc_plots/index.html`` from the offline page template
  (``.dvc/plots/offline.html``); every data chart must draw (a vega ``<canvas class="marks">``)
  with no network, and every image plot must be there.
* A loopback ``mlflow server`` on the repository's store: the experiment's runs table lists the
  pipeline runs, a run page shows the FID metric, and the compare view of the runs shows the
  swept parameter and FID side by side.

Usage (in a repository where ``dvc repro`` ran; ``--screenshots`` also saves PNGs)::

    python docs/tools/browser_check.py --repo . --screenshots docs/img

The server is started on a free loopback port and stopped by its PID; nothing else is reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str | None:
    """The headless browser's path, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _browser(url: str, *args: str, size: tuple[int, int] = (1600, 1000)) -> str:
    binary = chromium()
    if binary is None:
        raise RuntimeError("no chromium on PATH: apt-get install chromium")
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=10000", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.stdout


def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran."""
    return _browser(url, "--dump-dom")


def screenshot(url: str, path: Path, size: tuple[int, int] = (1600, 1000)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _browser(url, f"--screenshot={path.resolve()}", size=size)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return path


def plots_page(repo: Path, env: dict[str, str] | None = None) -> Path:
    """Run ``dvc plots show`` in ``repo``; the page it wrote."""
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=repo, env=env,
                   check=True, capture_output=True, text=True, timeout=300)
    return repo / "dvc_plots" / "index.html"


def check_plots_page(page: Path, data_charts: int) -> dict[str, int]:
    """Assert the page loads nothing from the network and draws ``data_charts`` vega charts."""
    html = page.read_text()
    remote = re.findall(r"<script[^>]+src=\"(https?://[^\"]+)\"", html)
    assert not remote, f"the plots page loads scripts from the network: {remote}"
    dom = dump_dom(page.resolve().as_uri())
    drawn = len(re.findall(r"<canvas[^>]*class=\"marks\"", dom)) + len(
        re.findall(r"<svg[^>]*class=\"marks\"", dom)
    )
    images = len(re.findall(r"<img ", dom))
    assert drawn == data_charts, f"{drawn} of {data_charts} charts drew"
    return {"charts": drawn, "images": images}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_uri: str) -> Iterator[str]:
    """A loopback ``mlflow server`` on ``store_uri``; yields its base URL, stops it by PID."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store_uri, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def rest(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def check_mlflow(base: str, experiment: str = "diffusion", swept: str | None = None,
                 screenshots: Path | None = None) -> dict[str, object]:
    """Assert the runs table, a run's metrics and the compare view of the pipeline runs."""
    with urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", timeout=30
    ) as response:
        exp = json.loads(response.read())["experiment"]
    exp_id = exp["experiment_id"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development", tags
    runs = rest(base, "runs/search", {
        "experiment_ids": [exp_id], "filter": "tags.`run.kind` = 'pipeline'",
        "order_by": ["attributes.start_time DESC"], "max_results": 50,
    })["runs"]
    assert runs, "no pipeline runs in the store"
    names = [r["info"]["run_name"] for r in runs]

    table_url = f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    table = dump_dom(table_url)
    missing = [n for n in names if n not in table]
    assert not missing, f"the runs table does not list {missing}"

    newest = runs[0]["info"]["run_id"]
    run_url = f"{base}/#/experiments/{exp_id}/runs/{newest}"
    run_page = dump_dom(run_url)
    fid_keys = sorted(set(re.findall(r"\bfid[a-z_]*/[a-z0-9_-]+", run_page)))
    assert fid_keys, "the run page shows no FID metric"

    ids = json.dumps([r["info"]["run_id"] for r in runs[:6]], separators=(",", ":"))
    compare_url = f"{base}/#/compare-runs?runs={ids}&experiments=[\"{exp_id}\"]"
    compare = dump_dom(compare_url)
    assert all(n in compare for n in names[:6]), "the compare view misses runs"
    if swept:
        assert swept in compare, f"the compare view does not show {swept}"
    if screenshots is not None:
        screenshot(table_url, screenshots / "mlflow_runs.png")
        screenshot(compare_url, screenshots / "mlflow_compare.png", size=(1600, 1400))
    return {"runs": names, "fid_metrics_on_run_page": fid_keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--charts", type=int, default=3, help="vega charts the page must draw")
    parser.add_argument("--swept", default=None, help="a param the compare view must show")
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args()
    repo = args.repo.resolve()
    page = plots_page(repo)
    print("dvc plots:", check_plots_page(page, args.charts))
    if args.screenshots is not None:
        screenshot(page.resolve().as_uri(), args.screenshots / "dvc_plots.png", size=(1400, 1800))
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo / 'mlflow.db'}"
    with mlflow_server(store) as base:
        print("mlflow:", check_mlflow(base, swept=args.swept, screenshots=args.screenshots))


if __name__ == "__main__":
    main()
