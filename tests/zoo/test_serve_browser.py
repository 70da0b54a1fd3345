"""The ``fusion-zoo serve`` page in headless Chromium (Selenium): upload an image and a clip, type text, predict.

Runs the real command on a shipped model in a subprocess, as a user would. Needs Debian's ``chromium`` and
``chromium-driver`` (``apt-get install -y chromium chromium-driver``): skipped when they are absent, except in CI
(``CI=true``), where that is a failure. ``FUSION_ZOO_SCREENSHOT=docs/serve.png`` also saves the page there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
MODEL = "tridigits-late-gating"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _need(what: str) -> None:
    message = (f"missing: {what}; the browser test needs Debian's chromium + chromium-driver "
               "(apt-get install -y chromium chromium-driver) and selenium (pip install -e '.[dev]')")
    if _in_ci():
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


def _binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        _need(", ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p))
    assert browser and driver
    return browser, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, chromedriver = _binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need("the selenium package")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fusion-zoo serve --model tridigits-late-gating`` in a subprocess (one per module); yields its URL."""
    import httpx

    _binaries()  # skip (or fail in CI) before loading the model
    tmp_path = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log = (tmp_path / "server.log").open("w+")
    cmd = [sys.executable, "-m", "zoo.cli", "serve", "--model", MODEL, "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"the server exited: {(tmp_path / 'server.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not come up in 240 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _sample(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """The first tridigits test sample as a PNG and a WAV file, its clue text and its true label."""
    import soundfile as sf

    from recipes.build_pretrained import raw_split

    raw, labels = raw_split("test", limit=1)
    image, audio = tmp_path / "digit.png", tmp_path / "digit.wav"
    raw["image"][0].save(image, "PNG")
    wav, rate = raw["audio"][0]
    sf.write(str(audio), wav, rate)
    return image, audio, raw["text"][0], labels[0]


def test_page_predicts_from_image_audio_and_text(browser: Any, server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, audio, text, label = _sample(tmp_path)
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    assert browser.find_element(By.ID, "model-name").text == MODEL
    assert browser.find_elements(By.CSS_SELECTOR, "#metrics-table tbody tr"), "the model card's metrics are shown"

    # no input: the page says so instead of calling the server
    browser.find_element(By.ID, "predict-btn").click()
    assert "at least one input" in browser.find_element(By.ID, "error").text

    # a file that is not an image: the server's 422 message appears on the page, not a stack trace
    bogus = tmp_path / "not-an-image.png"
    bogus.write_bytes(b"this is text, not a PNG")
    browser.find_element(By.ID, "image-input").send_keys(str(bogus))
    browser.find_element(By.ID, "predict-btn").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert "not a readable image" in error and "Traceback" not in error

    browser.find_element(By.ID, "image-input").send_keys(str(image))
    browser.find_element(By.ID, "audio-input").send_keys(str(audio))
    browser.find_element(By.ID, "text-input").send_keys(text)
    browser.find_element(By.ID, "predict-btn").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "pred-label").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.ID, "pred-label").text == label  # the dataset's label of this sample

    classes = browser.find_elements(By.CSS_SELECTOR, "#class-bars .bar")
    assert sorted(c.get_attribute("data-key") for c in classes) == [str(i) for i in range(10)]
    assert classes[0].get_attribute("data-key") == label  # the tallest bar is the predicted class
    bars = browser.find_elements(By.CSS_SELECTOR, "#modality-bars figure[data-group=gates] .bar.modality")
    shown = {b.get_attribute("data-modality"): float(b.get_attribute("data-value")) for b in bars}
    assert set(shown) == {"audio", "image", "text"}
    assert sum(shown.values()) == pytest.approx(1.0, abs=1e-4)  # the gating head's gates are a softmax

    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    target = os.environ.get("FUSION_ZOO_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


def test_page_works_with_text_alone(browser: Any, server: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    browser.find_element(By.ID, "text-input").send_keys("It is next to eight.")
    browser.find_element(By.ID, "predict-btn").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "pred-label").text)
    assert browser.find_element(By.ID, "pred-inputs").text == "from text"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#class-bars .bar")) == 10



# issue 30 (12): the page after an error, its bar groups, and a phone-sized window -------------------------------
JARGON = ("body.", "object at 0x", "Error opening", "Traceback", "items[")


def _ready(browser: Any, server: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def _predict_text(browser: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = browser.find_element(By.ID, "text-input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "predict-btn").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "pred-label").text)


def test_an_error_clears_the_old_result_and_reads_in_plain_words(browser: Any, server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _ready(browser, server)
    _predict_text(browser, "It is next to eight.")
    assert browser.find_element(By.ID, "result").is_displayed()

    bogus = tmp_path / "holiday.jpg"
    bogus.write_bytes(b"\xff\xd8 not really a JPEG")
    browser.find_element(By.ID, "image-input").send_keys(str(bogus))
    browser.find_element(By.ID, "predict-btn").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    browser.save_screenshot(str(tmp_path / "error.png"))
    assert error.startswith("The image is not a readable image"), error
    assert not any(j in error for j in JARGON), error
    # the previous prediction is gone, not left on screen beside the error
    assert not browser.find_element(By.ID, "result").is_displayed()
    assert browser.find_element(By.ID, "pred-label").text == ""
    assert not browser.find_elements(By.CSS_SELECTOR, "#class-bars .bar")
    assert (tmp_path / "error.png").stat().st_size > 5_000


def test_bar_groups_have_captions_absent_inputs_and_negative_values(browser: Any, server: str) -> None:
    from selenium.webdriver.common.by import By

    _ready(browser, server)
    _predict_text(browser, "It is next to eight.")
    groups = {g.get_attribute("data-group"): g for g in browser.find_elements(By.CSS_SELECTOR, "#modality-bars figure")}
    assert {"contribution", "share", "gates"} <= set(groups)
    for key in ("contribution", "share", "gates"):
        caption = groups[key].find_element(By.TAG_NAME, "figcaption").text
        assert caption.lower().startswith(key) and len(caption) > 40, caption  # a title and what it means
    gates = {b.get_attribute("data-modality"): b for b in groups["gates"].find_elements(By.CSS_SELECTOR, ".bar")}
    assert set(gates) == {"audio", "image", "text"}
    for absent in ("audio", "image"):  # the head has a gate for them, but they were not given: no bar, words
        assert "absent" in gates[absent].get_attribute("class")
        assert gates[absent].find_element(By.CSS_SELECTOR, ".val").text == "not given"
        assert not gates[absent].find_elements(By.CSS_SELECTOR, ".fill")
    assert gates["text"].find_element(By.CSS_SELECTOR, ".fill").size["width"] > 0

    # a negative contribution is drawn left of the axis (render() is the page's own drawing function)
    browser.execute_script("""render({label: "3", probs: {"3": 0.7, "5": 0.3}, inputs: ["image", "text"],
        explain: {contribution: {image: 0.4, text: -0.2}, share: {image: 0.667, text: 0.333}}});""")
    contribution = browser.find_element(By.CSS_SELECTOR, "#modality-bars figure[data-group=contribution]")
    rows = {b.get_attribute("data-modality"): b for b in contribution.find_elements(By.CSS_SELECTOR, ".bar")}
    axis = rows["text"].find_element(By.CSS_SELECTOR, ".axis").rect
    negative = rows["text"].find_element(By.CSS_SELECTOR, ".fill").rect
    positive = rows["image"].find_element(By.CSS_SELECTOR, ".fill").rect
    assert negative["width"] > 0 and negative["x"] + negative["width"] <= axis["x"] + 1  # left of the axis
    assert positive["x"] >= axis["x"] - 1 and positive["width"] == pytest.approx(2 * negative["width"], rel=0.05)
    assert rows["audio"].find_element(By.CSS_SELECTOR, ".val").text == "not given"


def test_the_page_fits_a_360_px_phone_without_sideways_scrolling(browser: Any, server: str, tmp_path: Path) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 360, "height": 780, "deviceScaleFactor": 1, "mobile": True})
    try:
        _ready(browser, server)
        assert browser.execute_script("return window.innerWidth") == 360
        _predict_text(browser, "It is next to eight.")
        browser.execute_script("document.getElementById('modality-bars').scrollIntoView()")
        browser.save_screenshot(str(tmp_path / "narrow.png"))  # the bars, as a phone shows them
        wide = browser.execute_script("""return [...document.querySelectorAll('body *')]
            .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5 && e.offsetParent !== null
                           && !e.closest('#card-metrics'))
            .map((e) => e.id || e.className || e.tagName);""")
        assert wide == [], wide  # nothing sticks out of the window (the metrics table scrolls inside its box)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 360
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
