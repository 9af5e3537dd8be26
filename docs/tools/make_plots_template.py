"""Write ``.dvc/plots/offline.html``: the page template of ``dvc plots show`` with vega, vega-lite
and vega-embed inlined, so the charts draw without a network (DVC's own page loads them from a
CDN). ``.dvc/config`` points ``plots.html_template`` at it.

Usage (the three files come from the npm registry, the versions DVC's renderer targets)::

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    for f in vega-*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python docs/tools/make_plots_template.py vega-5.20.2/package/build/vega.min.js \\
        vega-lite-5.2.0/package/build/vega-lite.min.js \\
        vega-embed-6.18.2/package/build/vega-embed.min.js

The libraries are BSD-3-Clause (University of Washington Interactive Data Lab); their licence
is kept in ``.dvc/plots/VEGA-LICENSE``.
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / ".dvc" / "plots" / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots (offline)</title>
    <!-- vega, vega-lite, vega-embed inlined by docs/tools/make_plots_template.py -->
%s
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(paths: list[str]) -> None:
    if len(paths) != 3:
        raise SystemExit("usage: make_plots_template.py VEGA_JS VEGA_LITE_JS VEGA_EMBED_JS")
    scripts = []
    for path in paths:
        code = Path(path).read_text()
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
            if placeholder in code:
                raise SystemExit(f"{path} contains {placeholder!r}: cannot inline it")
        scripts.append(f"<script>\n{code}\n</script>")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE % "\n".join(scripts))
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
