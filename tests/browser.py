"""Headless Chromium as a reader of the HTML reports: which pictures failed to load."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="chromium is not installed (apt-get install chromium)")
# Injected into a copy of the page: the title lists the images that failed to load.
IMAGE_CHECK = ("<script>window.addEventListener('load', () => { document.title = [...document.images]"
               ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')).join(',')"
               " || 'ALL-IMAGES-LOADED'; });</script>")


def page_images_in_chromium(page: Path) -> str:
    """'ALL-IMAGES-LOADED', or the comma-separated sources of the images that did not load."""
    probe = page.with_name("chromium_probe.html")
    probe.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--disable-background-networking", "--disable-component-update", "--no-first-run",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    probe.unlink()
    return re.search(r"<title>(.*?)</title>", dom).group(1)
