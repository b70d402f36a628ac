"""The documentation site: its build from the notebooks, and every page opened in headless Chromium.

The browser tests need Debian's `chromium` and `chromium-driver` and skip without them, unless
MEDSEG_REQUIRE_BROWSER=1 (set by .ci/run), which turns the skip into a failure. Screenshots of
every page go to MEDSEG_DOCS_SCREENSHOTS (default: build/docs-screenshots); the test prints the
folder.
"""

import base64
import functools
import html.parser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MEDSEG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MEDSEG_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_BROWSER = os.environ.get("MEDSEG_REQUIRE_BROWSER") == "1"
SCREENSHOTS = Path(os.environ.get("MEDSEG_DOCS_SCREENSHOTS", ROOT / "build" / "docs-screenshots"))
# Maximum screenshot height in CSS pixels, so longer pages are cut there.
MAX_SCREENSHOT_HEIGHT = 16000


def load_docs_prepare():
    spec = importlib.util.spec_from_file_location("docs_prepare", ROOT / "scripts" / "docs_prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_prepare"] = module  # dataclasses look the module up while it executes
    spec.loader.exec_module(module)
    return module


docs_prepare = load_docs_prepare()


def notebooks_in_reading_order():
    "Notebooks that must each become a page, relative to nbs/, in the order the site lists them."
    found = [path.relative_to(ROOT / "nbs") for path in (ROOT / "nbs").rglob("*.ipynb")]
    found = [path for path in found if not any(part.startswith((".", "_")) for part in path.parts)]
    return sorted(found, key=docs_prepare.reading_order)


def count_widget_views(path):
    "Count the stored ipywidgets outputs of a notebook."
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return sum(docs_prepare.WIDGET_VIEW in output.get("data", {})
               for cell in nb["cells"] for output in cell.get("outputs", []))


def count_shown_outputs(path):
    "Count the figures (PNG, JPEG) and HTML tables that a notebook stores in cells a page shows."
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    figures = tables = 0
    for cell in nb["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        options, _ = docs_prepare.split_options(source)
        hidden = {"hide", "export", "exporti"} & {line.split()[1] for line in source.splitlines()
                                                   if line.startswith("#| ") and len(line.split()) == 2}
        if cell["cell_type"] != "code" or hidden or docs_prepare.is_false(options.get("include", True)):
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            figures += "image/png" in data or "image/jpeg" in data
            tables += "<table" in "".join(data.get("text/html", ""))
    return figures, tables


def skip_or_fail(reason):
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (MEDSEG_REQUIRE_BROWSER=1 makes this a failure)")
    pytest.skip(reason)


# --- the staging step, on small notebooks made here ---------------------------------------------


def code_cell(source, outputs=()):
    return {"cell_type": "code", "execution_count": None, "id": "x", "metadata": {}, "outputs": list(outputs),
            "source": source}


def test_quarto_options_applied():
    markdown_output = {"output_type": "execute_result", "execution_count": None, "metadata": {},
                       "data": {"text/markdown": "---\n\n### f\n\n*Do f.*", "text/plain": "f"}}
    cells = [
        code_cell("#| echo: false\n#| output: asis\nshow_doc(f)", [markdown_output]),
        code_cell("#| include: false\nsecret = 1"),
        code_cell("#| echo: false\nprint(1)", [{"output_type": "stream", "name": "stdout", "text": "1\n"}]),
        code_cell("#| output: false\nprint(2)", [{"output_type": "stream", "name": "stdout", "text": "2\n"}]),
        code_cell("# NBVAL_CHECK_OUTPUT\nx = 3"),
    ]
    converted = docs_prepare.convert_cells(cells)

    assert [cell["cell_type"] for cell in converted] == ["markdown", "code", "code", "code"]
    assert converted[0]["source"] == "---\n\n### f\n\n*Do f.*"
    assert docs_prepare.REMOVE_INPUT_TAG in converted[1]["metadata"]["tags"]
    assert converted[1]["source"] == "print(1)"
    assert converted[2]["outputs"] == []
    assert converted[2]["source"] == "print(2)"
    assert converted[3]["source"] == "x = 3"


def test_widget_view_becomes_note():
    widget = {"output_type": "display_data", "metadata": {},
              "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2},
                       "text/plain": "IntSlider(value=3)"}}
    figure = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}
    outputs = docs_prepare.clean_outputs([widget, figure])

    assert len(outputs) == 2
    assert "IntSlider" in outputs[0]["data"]["text/html"]
    assert "widget-static-note" in outputs[0]["data"]["text/html"]
    assert docs_prepare.WIDGET_VIEW not in outputs[0]["data"]
    assert outputs[1] == figure


def test_progress_bar_keeps_final_state():
    stream = {"output_type": "stream", "name": "stderr",
              "text": ["\r", "  0%|  | 0/5 [00:00<?, ?it/s]\r", "100%|##| 5/5 [00:00<00:00]\n", "done\n"]}
    erased = {"output_type": "stream", "name": "stdout", "text": "\x1b[2K\r\x1b[2K\r"}
    outputs = docs_prepare.clean_outputs([stream, erased])

    assert outputs == [{**stream, "text": "100%|##| 5/5 [00:00<00:00]\ndone\n"}]


def test_heading_code_spans_become_html():
    markdown = "## The main job: `medseg segment train`\n\nText with `code`.\n\n```python\n# `not a heading`\n```"
    converted = docs_prepare.code_spans_in_headings(markdown)

    assert converted.splitlines()[0] == "## The main job: <code>medseg segment train</code>"
    assert "Text with `code`." in converted
    assert "# `not a heading`" in converted


def test_reading_order_puts_index_first():
    names = ["90_cli.ipynb", "01_data.ipynb", "index.ipynb", "00_core.ipynb", "10_al.ipynb"]
    ordered = sorted((Path(name) for name in names), key=docs_prepare.reading_order)
    assert [path.name for path in ordered] == ["index.ipynb", "00_core.ipynb", "01_data.ipynb", "10_al.ipynb",
                                               "90_cli.ipynb"]


def test_summary_problems_reported():
    two_lines = {"cells": [{"cell_type": "markdown", "source": "# T\n\n> one\n> two"}]}
    one_line = {"cells": [{"cell_type": "markdown", "source": "# T\n\n> one line"}]}
    no_title = {"cells": [{"cell_type": "markdown", "source": "Text"}]}

    assert len(docs_prepare.summary_problems(two_lines, "a.ipynb")) == 1
    assert docs_prepare.summary_problems(one_line, "b.ipynb") == []
    assert "H1 title" in docs_prepare.summary_problems(no_title, "c.ipynb")[0]


def test_notebook_titles_and_summaries():
    problems = []
    for relative in notebooks_in_reading_order():
        nb = json.loads((ROOT / "nbs" / relative).read_text(encoding="utf-8"))
        problems += docs_prepare.summary_problems(nb, f"nbs/{relative}")
    assert not problems, "\n".join(problems)


def test_quarto_config_valid():
    "nbs/_quarto.yml and nbs/nbdev.yml are what nbdev-docs needs where Quarto is installed."
    import tomllib

    import yaml

    quarto = yaml.safe_load((ROOT / "nbs" / "_quarto.yml").read_text(encoding="utf-8"))
    assert quarto["project"]["type"] == "website"
    assert (ROOT / "nbs" / quarto["format"]["html"]["css"]).is_file()
    assert quarto["metadata-files"] == ["nbdev.yml", "sidebar.yml"]

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["nbdev"]
    nbdev_yml = yaml.safe_load((ROOT / "nbs" / "nbdev.yml").read_text(encoding="utf-8"))
    assert nbdev_yml["project"]["output-dir"] == settings["doc_path"]
    assert nbdev_yml["website"]["title"] == settings["title"]


# --- the built site ------------------------------------------------------------------------------


def report(config, line):
    "Write a line to the pytest terminal, past output capture."
    capture = config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, pytestconfig):
    "Build the site with scripts/build_docs.sh into a temporary folder; return it and its page list."
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocs_jupyter") is None:
        skip_or_fail("mkdocs and mkdocs-jupyter are not installed; run bash scripts/setup.sh")
    if not (ROOT / "docs_assets/node_modules/mathjax").is_dir() and shutil.which("npm") is None:
        skip_or_fail("npm is missing, so MathJax cannot be installed; run bash scripts/install_docs_tools.sh")
    site_dir = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    result = subprocess.run(["bash", "scripts/build_docs.sh", "--site-dir", str(site_dir)], cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"build_docs.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    manifest = json.loads((ROOT / "_mkdocs" / "pages.json").read_text(encoding="utf-8"))
    report(pytestconfig, f"docs site built in {seconds:.1f} s into {site_dir}")
    return site_dir, manifest


def test_every_notebook_has_page(site):
    site_dir, manifest = site
    sources = [page["source"] for page in manifest]
    assert sources == [path.as_posix() for path in notebooks_in_reading_order()]
    assert manifest[0]["url"] == "index.html"
    for page in manifest:
        assert (site_dir / page["url"]).is_file(), f"{page['source']} has no page {page['url']}"


def test_search_index_covers_pages(site):
    site_dir, manifest = site
    index = json.loads((site_dir / "search" / "search_index.json").read_text(encoding="utf-8"))
    indexed = {doc["location"].split("#")[0] for doc in index["docs"]}
    missing = [page["url"] for page in manifest if page["url"] not in indexed]
    assert not missing, f"pages missing from the search index: {missing}"


class PageParser(html.parser.HTMLParser):
    "Collect element ids, link targets, code text and headings of one HTML page."

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.headings, self.code = set(), [], [], []
        self._heading, self._in_code = None, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("h1", "h2", "h3", "h4"):
            self._heading = []
        if tag == "pre":
            self._in_code += 1
            self.code.append("")

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append("".join(self._heading).strip().rstrip("¶").strip())
            self._heading = None
        if tag == "pre" and self._in_code:
            self._in_code -= 1

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._in_code:
            self.code[-1] += data


@functools.cache
def parse_page(path):
    parser = PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def test_hidden_cells_stay_hidden(site):
    site_dir, manifest = site
    for page in manifest:
        parsed = parse_page(site_dir / page["url"])
        directives = [line for block in parsed.code for line in block.splitlines()
                      if line.lstrip().startswith(("#|", "# NBVAL_"))]
        assert not directives, f"{page['url']} shows cell directives: {directives[:3]}"
        hidden = [block for block in parsed.code if "set_matplotlib_formats" in block or "nbdev_export" in block]
        assert not hidden, f"{page['url']} shows a hidden cell: {hidden[0][:200]}"


def test_api_reference_per_page(site):
    "Every public function and class that a notebook exports has its show_doc heading on its page."
    site_dir, manifest = site
    from medseg_nbdev._modidx import d as module_index

    urls = {page["url"] for page in manifest}
    missing = []
    for module, symbols in module_index["syms"].items():
        for qualified, (doc_link, _) in symbols.items():
            name = qualified[len(module) + 1:]
            if "." in name or name.startswith("_"):
                continue
            url = doc_link.split("#")[0]
            assert url in urls, f"{qualified} is documented on {url}, which the site does not have"
            if name not in parse_page(site_dir / url).headings:
                missing.append(f"{name} ({url})")
    assert not missing, f"exported names without show_doc output: {missing}"


# --- the site in headless Chromium ---------------------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class SiteServer(ThreadingHTTPServer):
    "HTTP server that ignores clients closing a connection early (Chromium does when it navigates)."

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server(site):
    "Serve the built site on 127.0.0.1 at a free port; yield its base URL."
    site_dir, _ = site
    httpd = SiteServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(site_dir)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    "A headless Chromium (Debian's) driven by Selenium, with a fresh profile and its logs enabled."
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            skip_or_fail(f"{binary} is missing; install it with: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed; run bash scripts/setup.sh")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # Selenium Manager would look for drivers on the network when a path is missing; the paths are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(pytestconfig):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    report(pytestconfig, f"screenshots of every page: {SCREENSHOTS}")
    return SCREENSHOTS


# Chromium's own pages (the new-tab page it opens at start) make requests that are not the site's.
BROWSER_SCHEMES = ("chrome", "chrome-untrusted", "chrome-extension", "devtools")


def network_problems(entries, base_url):
    "List failed requests, HTTP errors and requests to any host but the test server."
    host = urllib.parse.urlsplit(base_url).netloc
    problems, urls = [], {}
    for entry in entries:
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            url = params["request"]["url"]
            urls[params["requestId"]] = url
            scheme, netloc = urllib.parse.urlsplit(url)[:2]
            if scheme.startswith(BROWSER_SCHEMES):
                continue
            if scheme in ("http", "https", "ws", "wss") and netloc != host:
                problems.append(f"request to another host: {url}")
        elif message["method"] == "Network.loadingFailed":
            if urls.get(params["requestId"], "").startswith(BROWSER_SCHEMES):
                continue
            problems.append(f"failed request ({params.get('errorText')}): {urls.get(params['requestId'], '?')}")
        elif message["method"] == "Network.responseReceived" and params["response"]["status"] >= 400:
            problems.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
    return problems


PAGE_STATE_JS = """
const images = Array.from(document.images).map(img => ({src: img.src.slice(0, 80), complete: img.complete,
  width: img.naturalWidth}));
const outputs = Array.from(document.querySelectorAll('.jp-OutputArea-output'));
const blank = outputs.filter(o => o.getBoundingClientRect().height < 2 || !(o.textContent.trim() || o.querySelector('img,svg,canvas,table')));
return {
  images: images,
  outputImages: document.querySelectorAll('.jp-OutputArea-output img').length,
  outputTables: document.querySelectorAll('.jp-OutputArea-output table').length,
  blankOutputs: blank.map(o => o.outerHTML.slice(0, 200)),
  widgetNotes: Array.from(document.querySelectorAll('.widget-static-note')).filter(n => n.getBoundingClientRect().height > 10).length,
  widgetViews: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
  math: document.querySelectorAll('mjx-container').length,
  mathErrors: Array.from(document.querySelectorAll('mjx-merror')).map(e => e.getAttribute('data-mjx-error')),
  rawDollarMath: Array.from(document.querySelectorAll('.jp-MarkdownOutput')).some(cell => {
    const copy = cell.cloneNode(true);
    copy.querySelectorAll('code, pre, mjx-container').forEach(node => node.remove());
    return /\\$[^$\\s][^$]*\\$/.test(copy.textContent);
  }),
  navLinks: Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link[href]')).map(a => a.getAttribute('href')),
  height: Math.ceil(document.documentElement.scrollHeight),
};
"""

WAIT_FOR_MATH_JS = """
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(() => done(true), () => done(false));
} else { done(false); }
"""


def save_full_screenshot(driver, path, height):
    "Save a PNG of the whole page (cut at MAX_SCREENSHOT_HEIGHT) through the DevTools protocol."
    height = min(height, MAX_SCREENSHOT_HEIGHT)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def open_page(driver, url):
    "Load `url`, wait for MathJax, and return the page state and the new log entries."
    driver.get_log("performance")
    driver.get_log("browser")
    driver.get(url)
    driver.set_script_timeout(30)
    driver.execute_async_script(WAIT_FOR_MATH_JS)
    state = driver.execute_script(PAGE_STATE_JS)
    time.sleep(0.3)  # let the last font and image requests finish before reading the logs
    return state, driver.get_log("performance"), driver.get_log("browser")


@pytest.mark.parametrize("notebook", [path.as_posix() for path in notebooks_in_reading_order()])
def test_page_in_browser(notebook, site, server, browser, screenshots):
    site_dir, manifest = site
    page = next((page for page in manifest if page["source"] == notebook), None)
    assert page is not None, f"nbs/{notebook} has no page on the site"
    url = urllib.parse.urljoin(server, page["url"])
    state, performance, console = open_page(browser, url)

    shot = screenshots / (Path(page["url"]).with_suffix("").as_posix().replace("/", "_") + ".png")
    save_full_screenshot(browser, shot, state["height"])

    problems = network_problems(performance, server)
    assert not problems, f"{page['url']}: " + "; ".join(problems)
    errors = [entry["message"] for entry in console if entry["level"] == "SEVERE"]
    assert not errors, f"{page['url']} console errors: {errors}"

    broken = [image for image in state["images"] if not image["complete"] or image["width"] == 0]
    assert not broken, f"{page['url']} images not loaded: {broken}"
    figures, tables = count_shown_outputs(ROOT / "nbs" / notebook)
    assert state["outputImages"] == figures, f"{page['url']} shows {state['outputImages']} of {figures} stored figures"
    assert state["outputTables"] == tables, f"{page['url']} shows {state['outputTables']} of {tables} stored tables"
    assert not state["blankOutputs"], f"{page['url']} has blank output boxes: {state['blankOutputs'][:2]}"
    assert state["widgetViews"] == 0, f"{page['url']} has widget views without state"
    expected_notes = count_widget_views(ROOT / "nbs" / notebook)
    assert state["widgetNotes"] == expected_notes, (
        f"{page['url']} shows {state['widgetNotes']} widget notes for {expected_notes} widget outputs")

    assert not state["mathErrors"], f"{page['url']} TeX errors: {state['mathErrors']}"
    assert not state["rawDollarMath"], f"{page['url']} shows $...$ that MathJax did not typeset"

    expected_nav = [entry["url"] for entry in manifest]
    nav = [link.split("#")[0] for link in state["navLinks"] if not link.startswith("#")]
    nav = [urllib.parse.urljoin(page["url"], link) if link not in ("", ".") else page["url"] for link in nav]
    assert [link for link in dict.fromkeys(nav)] == expected_nav, f"{page['url']} navigation is not in reading order"


def link_problem(base_url, page_url, href, site_dir):
    "Return why an internal link from `page_url` does not resolve, or None when it does."
    target = urllib.parse.urljoin(urllib.parse.urljoin(base_url, page_url), href)
    parts = urllib.parse.urlsplit(target)
    if parts.scheme not in ("http", "https") or parts.netloc != urllib.parse.urlsplit(base_url).netloc:
        return None
    try:
        with urllib.request.urlopen(target.split("#")[0], timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    if status != 200:
        return f"{href} -> HTTP {status}"
    if parts.fragment:
        path = parts.path.lstrip("/") or "index.html"
        if path.endswith("/"):
            path += "index.html"
        file = site_dir / urllib.parse.unquote(path)
        if file.suffix == ".html" and urllib.parse.unquote(parts.fragment) not in parse_page(file).ids:
            return f"{href} -> no element with id '{parts.fragment}' in {path}"
    return None


def test_internal_links_resolve(site, server):
    site_dir, manifest = site
    problems = []
    for page in manifest:
        for href in dict.fromkeys(parse_page(site_dir / page["url"]).links):
            if href.startswith(("mailto:", "javascript:")):
                continue
            if (problem := link_problem(server, page["url"], href, site_dir)) is not None:
                problems.append(f"{page['url']}: {problem}")
    assert not problems, "broken internal links:\n" + "\n".join(problems)


def test_search_finds_pages(site, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    box = WebDriverWait(browser, 60).until(conditions.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input")))
    box.click()
    box.send_keys("hippocampus")
    results = WebDriverWait(browser, 90).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, ".md-search-result__item a"))
    hrefs = [result.get_attribute("href") for result in results]
    assert any("data.html" in href for href in hrefs), f"search for 'hippocampus' did not find the data page: {hrefs}"
