"""The page `weightstream serve` serves at /, in a real headless browser (Debian's chromium and
chromium-driver, driven by selenium): it loads, a prompt streams an answer token by token, the
live figures (hit rate, stall, read GB/s, per-layer bars) update, Stop cancels the generation.
The demo model runs under a memory budget (its FFNs streamed, the next layer's read ahead) so the
figures are real; a screenshot taken mid-answer is saved (to the test's temporary folder, or to
bench/figures/serve.png, the README's, with WEIGHTSTREAM_SCREENSHOT=1)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) drives the browser")

from weightstream.engine import Engine  # noqa: E402
from tests.serving import serving, wait_for  # noqa: E402

# the README's figure; refreshed only when asked (WEIGHTSTREAM_SCREENSHOT=1), so a test run leaves
# the checkout as it was; otherwise the screenshot goes to the test's temporary folder
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "figures" / "serve.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")


def _browser():
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    if binary is None or driver is None:
        pytest.skip(f"no headless browser: needs chromium ({'found ' + binary if binary else 'not found'}) and "
                    f"chromedriver ({'found ' + driver if driver else 'not found'}); on Debian: "
                    "apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,760"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser():
    b = _browser()
    yield b
    b.quit()


@pytest.fixture(scope="module")
def engine(demo_model):
    with Engine.load(demo_model, n_ctx=512, memory_budget="104MiB", prefetch="lookahead", threads=1,
                     profile=True) as eng:
        assert eng.store is not None  # the FFNs stream: the figures have something to show
        yield eng


def text(browser, id_: str) -> str:
    return browser.find_element("id", id_).text


def test_page_streams_an_answer_and_its_figures(browser, engine, tmp_path):
    with serving(engine, "SmolLM2-135M-Instruct") as (url, app):
        worker = app.state.worker
        browser.get(url + "/")
        wait_for(lambda: "SmolLM2" in text(browser, "model"), what="the page's first poll of /v1/stats")
        assert "104 MiB" in text(browser, "memory") and text(browser, "f-state") == "idle"
        assert text(browser, "f-hit") == "–" and not browser.find_elements("css selector", "#layers .bar")

        max_tokens = browser.find_element("id", "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("300")
        browser.find_element("id", "prompt").send_keys("Explain why the sky is blue, in detail.")
        browser.find_element("id", "send").click()
        answer = lambda: browser.find_elements("css selector", ".msg.assistant")  # noqa: E731
        # streaming: text grows while the message is still marked as streaming
        first = wait_for(lambda: answer() and len(answer()[-1].text) >= 20 and answer()[-1].text, what="the first words")
        wait_for(lambda: "streaming" in answer()[-1].get_attribute("class") and len(answer()[-1].text) > len(first) + 120,
                 what="more tokens while the answer streams")
        wait_for(lambda: text(browser, "f-state") == "generating" and text(browser, "f-hit") != "–",
                 what="the figures of the running generation")
        # read in one call: each poll replaces the bars, so elements found earlier may be stale
        heights = browser.execute_script("return [...document.querySelectorAll('#layers .bar')]"
                                         ".map(b => parseFloat(b.style.height))")
        assert len(heights) == engine.config.n_layer and max(heights) > 50, heights
        for id_ in ("f-hit", "f-stall", "f-gbps", "f-tps", "f-bpt"):
            assert text(browser, id_) not in ("", "–"), id_
        tps = text(browser, "f-tps")
        stamp = text(browser, "updated")
        wait_for(lambda: text(browser, "updated") != stamp, what="a later poll")  # the figures are live
        shot = README_SCREENSHOT if os.environ.get("WEIGHTSTREAM_SCREENSHOT") == "1" else tmp_path / "serve.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        n = len(worker.finished)
        browser.find_element("id", "stop").click()  # aborts the fetch: the server cancels the generation
        wait_for(lambda: len(worker.finished) > n, what="the stopped generation to end")
        job = worker.finished[-1]
        assert job.finish_reason == "cancelled" and 0 < job.generated < 300
        wait_for(lambda: "streaming" not in answer()[-1].get_attribute("class"), what="the page to end the answer")
        assert answer()[-1].text.startswith(first) and tps
        wait_for(lambda: text(browser, "f-state") == "idle", what="the figures to show the engine idle")
