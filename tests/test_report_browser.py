"""The report of a real store renders in headless Chromium: tables present, every image
decoded (naturalWidth > 0), no script error, no broken link, and a screenshot.

The store comes from real benches of two methods (Wanda and SparseGPT, 50% unstructured) on
the embedded SmolLM2, tracks 1, 3, 4, through the CLI (the session's `embedded_store`). Chromium is the Debian package that tests/browser-setup.sh
installs (CI runs it first and sets LLMCBENCH_REQUIRE_BROWSER=1, which turns a missing
browser into a failure instead of a skip).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from llmcbench.driver.reporting.browser import dump_dom, find_chromium

pytestmark = pytest.mark.slow

CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && (e.target.src || '').slice(0, 40)))), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const result = {
    tables: document.querySelectorAll('table').length,
    sections: document.querySelectorAll('section').length,
    images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')).filter(h => !h.startsWith('#')),
    number_cells: document.querySelectorAll('td.n').length,
    linked_number_cells: document.querySelectorAll('td.n > a[href]').length,
    errors: window.__errors,
  };
  const pre = document.createElement('pre');
  pre.id = 'selfcheck';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("LLMCBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is missing but LLMCBENCH_REQUIRE_BROWSER=1: run tests/browser-setup.sh")
        pytest.skip("chromium not installed: run tests/browser-setup.sh (CI does) to run the browser test")
    return path


@pytest.fixture(scope="module")
def real_report(chromium, embedded_store, tmp_path_factory, run_cli):
    runs = embedded_store[0]  # Wanda and SparseGPT on the embedded SmolLM2, tracks 1, 3, 4
    base = tmp_path_factory.mktemp("browser")
    png = base / "report.png"
    proc = run_cli("report", str(runs), "-o", str(runs / "report"), "--screenshot", str(png), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return runs / "report", png, proc.stdout


def test_report_renders_with_tables_images_and_no_broken_links(real_report):
    out, _, stdout = real_report
    assert "om_perf" in stdout and "report.html" in stdout
    html = (out / "report.html").read_text()
    check_page = out / "_selfcheck.html"  # beside the report, so relative links resolve the same way
    check_page.write_text(html.replace("</head>", CHECK_SCRIPT + "</head>", 1))
    dom = dump_dom(check_page)
    match = re.search(r'<pre id="selfcheck">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert result["errors"] == []
    assert result["tables"] >= 6 and result["sections"] >= 5
    assert result["images"] >= 2 and result["loaded"] == result["images"]  # Fig. 2 and the radar, decoded
    assert result["number_cells"] > 30 and result["linked_number_cells"] == result["number_cells"]
    results = [h for h in result["links"] if h.endswith("/result.json")]
    assert len(results) > 30
    broken = [h for h in result["links"] if not (out / h).resolve().is_file()]
    assert broken == []
    for heading in ("Track 1: compression performance (Table 1 layout)", "Track 3: compression (training) consumption",
                    "Track 4: inference consumption (Table 3 layout)", "Compare with paper", "Fairness check", "profile quick"):
        assert heading in dom, heading
    assert "matches no model of the paper" in dom  # a local model: no invented matches


def test_screenshot_is_a_rendered_page(real_report):
    from matplotlib.image import imread

    _, png, _ = real_report
    pixels = imread(png)
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= 1000
    assert pixels[..., :3].std() > 0.05  # not a blank page
    if os.environ.get("LLMCBENCH_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["LLMCBENCH_KEEP_SCREENSHOT"])


def test_a_screenshot_chromium_cannot_write_is_one_line(chromium, tmp_path, run_cli, one_line_error):
    """Chromium's stderr is many lines (dbus, sandbox warnings): the error keeps its last one."""
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = run_cli("report", str(runs), "--screenshot", "/proc/llmcbench-no.png", timeout=300)
    one_line_error(proc, "chromium wrote no screenshot")
