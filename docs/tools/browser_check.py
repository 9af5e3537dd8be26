"""What a user sees in the browser, checked in headless Chromium (Debian's ``chromium``).

* ``dvc plots show`` writes ``dvc_plots/index.html`` from the offline page template
  (``.dvc/plots/offline.html``); every data chart must draw (a vega ``<canvas class="marks">``)
  with no network, and every image plot must be there.
* A loopback ``mlflow server`` on the repository's store: the experiment's runs table lists the
  pipeline runs (the newest with its method runs nested under it), the saved methods view
  (``viewStateShareKey=methods``) lists every method run with its FID, interval and paired
  difference to the baseline, a method run's page shows its scores, and the compare view of the
  pipeline runs shows the swept parameter and each run's ``fid/<method>`` side by side.

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
VIEW_SIZE = (2400, 820)  # wide enough for every column of the methods view


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


def dump_dom(url: str, size: tuple[int, int] = (1600, 1000)) -> str:
    """The page's DOM after its scripts ran (a wide ``size`` renders more table columns)."""
    return _browser(url, "--dump-dom", size=size)


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
                 screenshots: Path | None = None, methods: int | None = None,
                 compare_metric: str | None = None) -> dict[str, object]:
    """Assert the runs table, the methods view, a method run's page and the compare view of the
    pipeline runs; ``methods``: how many method runs the newest pipeline run must have;
    ``compare_metric``: a metric (``fid/ddim50``) the compare view must show."""
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
    newest = runs[0]["info"]["run_id"]
    children = rest(base, "runs/search", {
        "experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{newest}'",
        "max_results": 1000,
    }).get("runs", [])
    method_names = sorted(r["info"]["run_name"] for r in children)
    assert children, "the newest pipeline run has no method runs"
    if methods is not None:
        assert len(children) == methods, f"{len(children)} method runs, expected {methods}"

    table_url = f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    table = dump_dom(table_url)
    missing = [n for n in names if n not in table]
    assert not missing, f"the runs table does not list {missing}"
    shown = re.search(r"(\d+)(?:</strong>)?\s*matching runs", table)
    assert shown, "the runs table shows no run count"

    view_url = f"{table_url}&viewStateShareKey=methods"
    view = dump_dom(view_url, size=VIEW_SIZE)
    absent = [m for m in method_names if f">{m}<" not in view]
    assert not absent, f"the methods view does not list {absent}"
    for column in ("fid_ci_low", "fid_diff", "fid_diff_ci_high", "nfe"):
        assert f">{column}<" in view, f"the methods view has no {column} column"
    assert names[0] not in view, "the methods view lists the pipeline run itself"

    child = children[0]["info"]["run_id"]
    run_page = dump_dom(f"{base}/#/experiments/{exp_id}/runs/{child}")
    fid_keys = sorted(set(re.findall(r">(fid[a-z_]*)<", run_page)))
    assert {"fid", "fid_diff"} <= set(fid_keys), f"a method run's page shows {fid_keys}"

    ids = json.dumps([r["info"]["run_id"] for r in runs[:6]], separators=(",", ":"))
    compare_url = f"{base}/#/compare-runs?runs={ids}&experiments=[\"{exp_id}\"]"
    compare = dump_dom(compare_url)
    assert all(n in compare for n in names[:6]), "the compare view misses runs"
    if swept:
        assert swept in compare, f"the compare view does not show {swept}"
    if compare_metric:
        assert compare_metric in compare, f"the compare view does not show {compare_metric}"
    if screenshots is not None:
        screenshot(table_url, screenshots / "mlflow_runs.png")
        screenshot(view_url, screenshots / "mlflow_methods.png", size=VIEW_SIZE)
        screenshot(compare_url, screenshots / "mlflow_compare.png", size=(1600, 1400))
    return {"runs": names, "methods": method_names, "fid_metrics_on_run_page": fid_keys,
            "run_count_shown": int(shown.group(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--charts", type=int, default=3, help="vega charts the page must draw")
    parser.add_argument("--swept", default=None, help="a param the compare view must show")
    parser.add_argument("--methods", type=int, default=None,
                        help="method runs the newest pipeline run must have")
    parser.add_argument("--compare-metric", default=None,
                        help="a metric the compare view must show (fid/ddim50)")
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args()
    repo = args.repo.resolve()
    page = plots_page(repo)
    print("dvc plots:", check_plots_page(page, args.charts))
    if args.screenshots is not None:
        screenshot(page.resolve().as_uri(), args.screenshots / "dvc_plots.png", size=(1400, 1800))
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo / 'mlflow.db'}"
    with mlflow_server(store) as base:
        print("mlflow:", check_mlflow(base, swept=args.swept, screenshots=args.screenshots,
                                      methods=args.methods, compare_metric=args.compare_metric))


if __name__ == "__main__":
    main()
