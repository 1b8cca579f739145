"""The web chat page in headless Chromium (selenium): upload two images, ask, get the streamed answer, ask again
with no new image, start a new conversation, see a refused message keep its text and images. The answers must be
what the API gives for the same conversation. A screenshot is saved under runs/artifacts/ (path printed).

Needs Debian's ``chromium`` and ``chromium-driver``; ``tools/setup_venv.sh`` (run by ``tests/run.sh``) installs them
when it runs as root with apt-get. Without them this test fails and says so, rather than passing unseen."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .test_server import client, data_url, running_server, user
from .tiny import write_png

ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "artifacts"
QUESTIONS = ["What colour is the shape in image 1?", "And which one is bigger?"]


def _browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: run tools/setup_venv.sh as root "
                    "(it installs them with apt-get), or `apt-get install chromium chromium-driver`")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    # An explicit driver path: selenium's driver manager (which downloads) is never started.
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


def _wait_for_answer(browser, count: int) -> str:
    """The text of the ``count``-th assistant message once its stream has ended."""
    def finished(b):
        done = b.find_elements(By.CSS_SELECTOR, ".message.assistant.done, .message.assistant.error")
        return done if len(done) >= count else False

    last = WebDriverWait(browser, 120).until(finished)[count - 1]
    assert "error" not in last.get_attribute("class"), last.text
    return last.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")


def test_chat_page_in_a_real_browser(browser, chat_ckpt, tmp_path):
    images = [write_png(tmp_path / "orange.png", (240, 140, 20), (64, 48)),
              write_png(tmp_path / "teal.png", (20, 170, 170), (48, 64))]
    with running_server(chat_ckpt, tmp_path, "--max-new-tokens", "8", "--model-name", "tiny-vchat") as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "tiny-vchat")
        browser.find_element(By.ID, "image-input").send_keys("\n".join(images))
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
        browser.find_element(By.ID, "question").send_keys(QUESTIONS[0])
        browser.find_element(By.ID, "send").click()
        first = _wait_for_answer(browser, 1)
        browser.find_element(By.ID, "question").send_keys(QUESTIONS[1])
        browser.find_element(By.ID, "send").click()
        second = _wait_for_answer(browser, 2)

        shown = browser.find_elements(By.CSS_SELECTOR, ".message.user")
        assert len(shown[0].find_elements(By.TAG_NAME, "img")) == 2  # images inline where they were sent
        assert not shown[1].find_elements(By.TAG_NAME, "img")
        assert not browser.find_elements(By.CSS_SELECTOR, "#attachments img")  # sent, so no longer attached
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = tmp_path / "chat_page.png"
        assert browser.save_screenshot(str(screenshot))
        shutil.copy(screenshot, ARTIFACTS / "server_browser_chat_page.png")
        print(f"\nscreenshot: {screenshot} (copied to {ARTIFACTS / 'server_browser_chat_page.png'})")

        # the same conversation through the API gives the same answers
        api = client(url)
        messages = [user(QUESTIONS[0], *(data_url(Path(p).read_bytes()) for p in images))]
        expected = [api.chat.completions.create(model="tiny-vchat", messages=messages).choices[0].message.content]
        messages += [{"role": "assistant", "content": expected[0]}, user(QUESTIONS[1])]
        expected.append(api.chat.completions.create(model="tiny-vchat", messages=messages)
                        .choices[0].message.content)
        assert [first, second] == expected

        browser.find_element(By.ID, "new-conversation").click()
        assert not browser.find_elements(By.CSS_SELECTOR, ".message")

        # a refused message shows the server's error and keeps its text and images for another try
        browser.find_element(By.ID, "image-input").send_keys(images[0])
        browser.execute_script("arguments[0].value = arguments[1]", browser.find_element(By.ID, "question"),
                               "colour " * 600)  # typing 4200 characters key by key would take seconds
        browser.find_element(By.ID, "send").click()
        error = WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.error"))[0]
        assert "does not fit the context" in error.text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1
        assert browser.find_element(By.ID, "question").get_property("value").startswith("colour colour")
