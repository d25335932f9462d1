"""The web chat page in a real browser: headless Chromium driven by Selenium.

The server runs in-process (uvicorn in a thread, on a free loopback port) over a tiny random
Stage 2 model whose greedy answers always run to max_tokens. The page must stream the answer
chunk by chunk, end with exactly the text a non-streamed request returns, keep the
conversation (images stay with the turn they came with) across turns, and send the API key.
Needs Debian's `chromium` and `chromium-driver` (scripts/setup.sh installs them as root).
"""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.filterwarnings("ignore:Glyph .* missing from font"),   # the random model's gibberish in the heatmap title
    pytest.mark.skipif(not CHROMIUM.exists(), reason="browser test needs /usr/bin/chromium "
                       "(apt-get install chromium chromium-driver, or run scripts/setup.sh as root)"),
    pytest.mark.skipif(not Path(CHROMEDRIVER).exists(), reason="browser test needs chromedriver "
                       "(apt-get install chromium-driver, or run scripts/setup.sh as root)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="browser test needs selenium (pip install selenium)")
pytest.importorskip("uvicorn", reason="serving needs uvicorn (pip install 'vlmkit[serve]')")
httpx = pytest.importorskip("httpx")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from vlmkit.serving.local import BackgroundServer  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MAX_TOKENS = 12
WAIT_S = 20


@pytest.fixture(scope="module")
def assistant(tiny_vlm_dir):
    import vlmkit

    return vlmkit.load(tiny_vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def server(assistant):
    from vlmkit.serving.app import create_app

    with BackgroundServer(create_app({"tiny": assistant})) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (48, 48), (235, 235, 235))
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=(220, 20, 20))
    path = tmp_path_factory.mktemp("page") / "circle.png"
    image.save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def wait(driver, condition, message: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")


def answers(driver, state: str = "done"):
    return driver.find_elements(By.CSS_SELECTOR, f"#messages .message.assistant[data-state={state}]")


def page_error(driver) -> str:
    errors = driver.find_elements(By.CSS_SELECTOR, "#error:not([hidden]), #messages .error")
    return " | ".join(e.get_attribute("textContent") for e in errors)


def ask_on_page(driver, question: str, turn: int, *, enter: bool = False):
    box = driver.find_element(By.ID, "question")
    box.send_keys(question)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: len(answers(d)) == turn or page_error(d),
         f"no finished answer for turn {turn}")
    assert not page_error(driver), page_error(driver)
    message = answers(driver)[-1]
    return message.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent"), message


def complete(url: str, messages: list[dict]) -> str:
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_page_streams_answers_and_keeps_the_conversation(server, browser, png):
    driver = browser
    open_page(driver, server.url)
    wait(driver, lambda d: d.execute_script("return document.getElementById('model').value") == "tiny",
         "the model list was not filled from /v1/models")
    assert driver.find_element(By.CSS_SELECTOR, "label[for=question]")   # every control is labelled
    assert driver.find_element(By.CSS_SELECTOR, "label[for=image-input]")

    # Settings: few tokens (still several chunks), greedy, and the heatmap after each answer.
    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0"
    driver.find_element(By.ID, "heatmap").click()
    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()

    # Turn 1: an image from the file input, sent with the button.
    driver.find_element(By.ID, "image-input").send_keys(str(png))
    preview = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#previews img"), "no image preview")[0]
    assert preview.get_attribute("src") == data_url(png)     # small PNGs go byte for byte
    first, message = ask_on_page(driver, "What colour is the circle?", 1)
    user1 = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": "What colour is the circle?"}]}
    assert first.strip(), "the assistant answer is empty"
    assert int(message.get_attribute("data-chunks")) > 1, "the answer was not streamed in several chunks"
    assert first == complete(server.url, [user1])            # greedy: streaming changes nothing
    assert not driver.find_elements(By.CSS_SELECTOR, "#previews img")   # the image went with turn 1
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .message.user img")
    heatmap = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".heatmap[data-state=done] img")
                   or page_error(d), "no attention heatmap under the answer")
    assert not isinstance(heatmap, str), page_error(driver)
    assert heatmap[0].get_attribute("src").startswith("data:image/png;base64,")

    # Turn 2: no new image, sent with Enter; the whole history goes with it.
    second, message = ask_on_page(driver, "Is there a green square?", 2, enter=True)
    history = [user1, {"role": "assistant", "content": first},
               {"role": "user", "content": [{"type": "text", "text": "Is there a green square?"}]}]
    assert driver.execute_script("return window.vlmkitChat.history") == [*history,
                                                                          {"role": "assistant", "content": second}]
    assert int(message.get_attribute("data-chunks")) > 1
    assert second == complete(server.url, history)

    # New chat forgets everything.
    driver.find_element(By.ID, "new-chat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message")
    assert driver.execute_script("return window.vlmkitChat.history") == []

    # Two images chosen at once go with one question, in order.
    from PIL import Image

    other = png.parent / "square.png"
    Image.new("RGB", (40, 30), (20, 160, 40)).save(other)
    driver.find_element(By.ID, "image-input").send_keys(f"{png}\n{other}")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#previews img")) == 2, "not two image previews")
    both, _ = ask_on_page(driver, "Which one is red?", 1)
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                        {"type": "image_url", "image_url": {"url": data_url(other)}},
                                        {"type": "text", "text": "Which one is red?"}]}
    assert driver.execute_script("return window.vlmkitChat.history")[0] == user
    assert both == complete(server.url, [user])


def test_shift_enter_is_a_newline_and_errors_are_readable(server, browser, png):
    driver = browser
    open_page(driver, server.url)
    wait(driver, lambda d: d.execute_script("return document.getElementById('model').value") == "tiny",
         "the model list was not filled")
    box = driver.find_element(By.ID, "question")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message")

    # A request the server refuses (max_tokens over its limit) shows the server's message and gives
    # the question back for another try.
    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("100000")
    driver.find_element(By.ID, "image-input").send_keys(str(png))
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#previews img"), "no image preview")
    driver.find_element(By.ID, "send").click()
    failed = wait(driver, lambda d: answers(d, "error"), "no error shown")[0]
    assert "max_tokens" in failed.find_element(By.CSS_SELECTOR, ".error").text
    assert box.get_attribute("value") == "first line\nsecond line"
    assert driver.find_elements(By.CSS_SELECTOR, "#previews img")       # the image is back too
    assert driver.execute_script("return window.vlmkitChat.history") == []


def test_api_key_field_sends_a_bearer_token(assistant, browser):
    from vlmkit.serving.app import ServeSettings, create_app

    with BackgroundServer(create_app({"tiny": assistant}, ServeSettings(api_key="sesame"))) as locked:
        driver = browser
        open_page(driver, locked.url)
        wait(driver, lambda d: "API key" in d.find_element(By.ID, "error").text, "no readable 401 error")
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        key = driver.find_element(By.ID, "api-key")
        key.send_keys("sesame", Keys.TAB)                   # "change" stores it and lists the models again
        wait(driver, lambda d: d.execute_script("return document.getElementById('model').value") == "tiny",
             "the models were not listed with the key")
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert driver.execute_script("return localStorage.getItem('vlmkit.apiKey')") == "sesame"
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        text, message = ask_on_page(driver, "Describe the image.", 1, enter=True)
        assert text.strip() and message.get_attribute("data-state") == "done"
