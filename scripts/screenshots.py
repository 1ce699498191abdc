"""Screenshots of a capscale report as a reader sees it, by headless Chromium: docs/screenshots/*.png.

    python scripts/screenshots.py runs/demo/report            # → docs/screenshots/demo-*.png
    python scripts/screenshots.py runs/demo/report --out DIR --chromium /usr/bin/chromium

One viewport-sized shot per part of the page (the answers at the top, then each
question's section), so the README can show what a newcomer will see. Regenerate
them after a change to the report; they are never edited by hand.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# file stem → anchor in index.html ("" = the top of the page)
SHOTS = {
    "answers": "",
    "q1-capacity": "q1",
    "q2-matched-loss": "q2",
    "q3-structure": "q3",
    "q4-regimes": "q4",
    "q5-optimizer-architecture": "q5",
    "design": "design",
    "per-layer": "per-layer",
    "law": "law",  # shown when the design varies more than width
    "plasticity": "plasticity",  # shown when the sweep holds plasticity continuations
}
WINDOW = (1280, 1000)


def chromium(path: str | None) -> str:
    found = path or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found or not Path(found).exists():
        raise SystemExit("screenshots: no Chromium found (Debian: apt-get install chromium; or pass --chromium)")
    return found


def _focused(page: str, anchor: str) -> str:
    """The page with only one part shown, at the top (headless shots of a scrolled page come out blank)."""
    hide = "section, nav" if not anchor else f"h1, .subtitle, .summary, nav, section:not(#{anchor})"
    return page.replace("</style>", f"{hide} {{ display: none !important; }}</style>", 1)


def shoot(browser: str, page: Path, anchor: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        copy = Path(profile) / "page.html"
        copy.write_text(_focused(page.read_text(encoding="utf-8"), anchor), encoding="utf-8")
        url = copy.as_uri()
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--force-device-scale-factor=1",
            "--virtual-time-budget=10000",  # let the figures decode before the shot
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--screenshot={out.resolve()}",
            url,
        ]
        subprocess.run(cmd, capture_output=True, timeout=180, check=False)
    if not out.is_file():
        raise SystemExit(f"screenshots: Chromium wrote no {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="a report directory (with index.html)")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="output directory")
    p.add_argument("--prefix", default="demo", help="file name prefix (default demo)")
    p.add_argument("--chromium", default=None, help="path to a Chromium binary")
    args = p.parse_args(argv)
    page = args.report / "index.html"
    if not page.is_file():
        print(f"screenshots: error: no index.html in {args.report}", file=sys.stderr)
        return 2
    browser = chromium(args.chromium)
    args.out.mkdir(parents=True, exist_ok=True)
    html = page.read_text(encoding="utf-8")
    for stem, anchor in SHOTS.items():
        if anchor and f'id="{anchor}"' not in html:  # a section this report does not show
            continue
        out = args.out / f"{args.prefix}-{stem}.png"
        shoot(browser, page, anchor, out)
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
