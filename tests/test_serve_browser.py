"""The search page in a real browser: headless Chromium (Debian's, driven by selenium) against
`mmretrieve serve` running as its own process on a loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import random_image

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("MMRETRIEVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        return f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); .ci/run installs them"
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (pip install -e '.[dev]')"
    return None


if browser_missing():
    pytest.skip(browser_missing(), allow_module_level=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_config):
    """An index of a few captioned colour photos, served by `mmretrieve serve` on 127.0.0.1."""
    import httpx
    import torch

    from mmretrieve.bundle import save_bundle
    from mmretrieve.cli import cli
    from mmretrieve.model import build_model
    from tiny_models import make_colour_dataset

    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    bundle = save_bundle(build_model(tiny_model_config), root / "bundle").path
    make_colour_dataset(root / "photos", per_colour=2, size=96)
    random_image(5, (400, 300)).save(root / "photos" / "noise.jpg")
    result = CliRunner().invoke(cli, ["index", str(root / "photos"), "--model", str(bundle), "--index-dir",
                                      str(root / "index"), "--workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mmretrieve", "serve", "--index-dir", str(root / "index"), "--port", str(port),
         "--thumb-cache", str(root / "thumbs"), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.3)
        yield {"url": base, "photos": root / "photos"}
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


LOADED_IMAGES = """
const images = [...document.querySelectorAll('#results img')];
return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0) ? images.length : 0;
"""


def wait_for_thumbnails(browser, at_least: int) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 60, poll_frequency=0.2).until(
        lambda driver: (n := driver.execute_script(LOADED_IMAGES)) >= at_least and n)


def test_typing_a_query_shows_result_thumbnails(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server["url"] + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys("a red ball", Keys.ENTER)
    assert wait_for_thumbnails(browser, 15) == 15  # 15 photos indexed, 24 asked for: all of them
    status = browser.find_element(By.ID, "status").text
    assert "photos for “a red ball”" in status, status
    cards = browser.find_elements(By.CSS_SELECTOR, "#results a.card")
    assert cards[0].get_attribute("href").startswith(server["url"] + "/file/")
    scores = [float(card.find_element(By.CLASS_NAME, "score").text) for card in cards]
    assert scores == sorted(scores, reverse=True)
    assert "?q=a+red+ball" in browser.current_url  # the query is in the address, so it can be shared
    shot = tmp_path / "search-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_uploading_an_image_searches_by_it(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server["url"] + "/")
    query = server["photos"] / "noise.jpg"
    browser.find_element(By.ID, "upload").send_keys(str(query))
    wait_for_thumbnails(browser, 1)
    first = browser.find_element(By.CSS_SELECTOR, "#results a.card")
    assert first.get_attribute("title") == str(Path(query).resolve())
    assert "this image" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "image-search.png"))


def test_words_in_the_box_refine_an_uploaded_image(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server["url"] + "/")
    browser.find_element(By.ID, "q").send_keys("a red ball")
    browser.find_element(By.ID, "upload").send_keys(str(server["photos"] / "noise.jpg"))
    wait_for_thumbnails(browser, 1)
    assert "this image + “a red ball”" in browser.find_element(By.ID, "status").text


def test_a_server_error_message_is_shown_not_thrown(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server["url"] + "/?q=" + "x" * 1200)
    status = browser.find_element(By.ID, "status")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda _: "longer than" in status.text)
    assert "error" in status.get_attribute("class")
