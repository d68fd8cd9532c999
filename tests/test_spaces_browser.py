"""The Space in a real headless browser (chromium through selenium and /usr/bin/chromedriver), checked for what a
visitor sees: images shown whole inside their boxes with no label or button over them, a whole gallery for 16
images and for one large one, refusals that stay on the page and leave every panel as it was, the cost shown and
capped before the click, uploads refused the moment they arrive, a drawing pad that draws at once, clickable
examples, the interpolation's inputs for its mode, and a phone's first screen. Screenshots are kept under the
test's tmp dir and copied to test-artifacts/ for people to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no traffic off loopback

import numpy as np
import PIL.Image
import pytest
from conftest import random_model

from tarflow_hf import TarFlowPipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "spaces_demo"))  # the Space's package sits beside app.py, as it does on the Hub

from tarflow_space import build_demo, launch  # noqa: E402
from test_spaces_demo import save_tiny_starflow  # noqa: E402

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "install chromium, chromium-driver and selenium (`bash .ci/install-demo-deps`)"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
DESKTOP = "--window-size=1280,1400"
PHONE = {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 2}}
TIMEOUT = 45  # seconds for the page and for one request, on a busy 2-core machine
MAX_ROWS = 5000  # the budget here: 16 exact images fit, the newton sampler's images do not
TOAST_SECONDS = 10  # how long Gradio shows an error by default

# For every <img> under a selector: its displayed box, the part of it left visible by every clipping box around it
# within its component (the page's own scrolling aside: that is not clipping), its natural size and how it is fitted.
IMAGE_BOXES = """
return Array.from(document.querySelectorAll(arguments[0])).filter(img => img.complete && img.naturalWidth > 0)
  .map(img => {
    const box = img.getBoundingClientRect();
    let [left, top, right, bottom] = [box.left, box.top, box.right, box.bottom];
    const component = img.closest('.block');
    for (let e = img.parentElement; e && component.contains(e); e = e.parentElement) {
      const style = getComputedStyle(e);
      if (style.overflowX === 'visible' && style.overflowY === 'visible') continue;
      const clip = e.getBoundingClientRect();
      left = Math.max(left, clip.left); top = Math.max(top, clip.top);
      right = Math.min(right, clip.right); bottom = Math.min(bottom, clip.bottom);
    }
    const visible = Math.max(0, right - left) * Math.max(0, bottom - top);
    return {width: box.width, height: box.height, visible: visible / (box.width * box.height),
            natural: [img.naturalWidth, img.naturalHeight], fit: getComputedStyle(img).objectFit};
  });
"""
# The labels, captions and buttons of the block under a selector that overlap one of its pictures.
COVERED = """
const root = document.querySelector(arguments[0]);
const images = Array.from(root.querySelectorAll('img')).filter(i => i.getBoundingClientRect().width > 0);
const marks = Array.from(root.querySelectorAll('label, .caption-label, button, .icon-button-wrapper'))
  .filter(m => m.getBoundingClientRect().width > 0 && !images.some(i => m.contains(i)));
const covered = [];
for (const image of images) {
  const a = image.getBoundingClientRect();
  for (const mark of marks) {
    const b = mark.getBoundingClientRect();
    const width = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    const height = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    if (width > 1 && height > 1)
      covered.push(mark.className + ' ' + mark.textContent.trim().slice(0, 20));
  }
}
return covered;
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(demo) -> str:
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def budget():
    """The budget of every request while these servers run (read per request)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TARFLOW_MAX_ROWS", str(MAX_ROWS))
        yield


@pytest.fixture(scope="module")
def tarflow_server(tmp_path_factory, budget):
    """The Space on loopback with a tiny random TarFlow, chosen the way a deployment does: $TARFLOW_MODEL."""
    folder = tmp_path_factory.mktemp("browser-model") / "tiny"
    model = random_model(seed=2, id2label={0: "circle", 1: "square", 2: "triangle"})
    TarFlowPipeline(transformer=model).save_pretrained(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TARFLOW_MODEL", str(folder))
        demo = build_demo()
    yield serve(demo)
    demo.close()


@pytest.fixture(scope="module")
def starflow_server(tmp_path_factory, budget):
    demo = build_demo(str(save_tiny_starflow(tmp_path_factory.mktemp("browser-starflow") / "tiny-starflow")))
    yield serve(demo)
    demo.close()


def chromium(*flags: str, mobile: dict | None = None):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"the browser test needs {', '.join(missing)}: {INSTALL_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"the browser test needs the selenium package: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, *flags):
        options.add_argument(flag)
    if mobile:
        options.add_experimental_option("mobileEmulation", mobile)
    # An explicit driver path: selenium then never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = chromium(DESKTOP)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def phone():
    driver = chromium(mobile=PHONE)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------------ helpers
def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the browser wrote no screenshot"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / name)
    return path


def open_page(driver, url: str, tab: str | None = None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, TIMEOUT)
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button[role=tab]")))
    if tab:
        click_tab(driver, tab)
    return wait


def click_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[@role='tab'][normalize-space(.)='{name}']").click()
    time.sleep(0.3)


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def image_boxes(driver, selector: str) -> list[dict]:
    return driver.execute_script(IMAGE_BOXES, selector)


def settled_boxes(driver, selector: str) -> list[dict]:
    """`image_boxes` once the layout has stopped moving (Gradio animates a gallery into place)."""
    boxes = image_boxes(driver, selector)
    for _ in range(20):
        time.sleep(0.25)
        again = image_boxes(driver, selector)
        if again == boxes:
            return boxes
        boxes = again
    raise AssertionError(f"the pictures under {selector} kept moving: {boxes}")


def field(driver, label: str, kind: str = "input[type=number]"):
    """The input of the block whose label starts with `label`."""
    from selenium.webdriver.common.by import By

    blocks = driver.find_elements(By.CSS_SELECTOR, ".block")
    for block in blocks:
        if block.is_displayed() and block.text.strip().startswith(label):
            found = block.find_elements(By.CSS_SELECTOR, kind)
            if found:
                return found[0]
    raise AssertionError(f"no field labelled {label!r}")


def type_into(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(text, Keys.ENTER)
    time.sleep(0.5)


def generate(driver, wait, count: int) -> None:
    from selenium.webdriver.common.by import By

    button = driver.find_element(By.CSS_SELECTOR, "#generate-button")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    wait.until(lambda d: len(image_boxes(d, "#samples img")) == count and "image(s) in" in d.find_element(
        By.CSS_SELECTOR, "#timing").text)  # fmt: skip


def assert_shown_whole(boxes: list[dict], count: int) -> None:
    """`count` pictures, each entirely visible (nothing clipped by a box around it), drawn at their own aspect
    ratio or fitted whole into their box."""
    assert len(boxes) == count, boxes
    for box in boxes:
        assert box["visible"] > 0.99, box
        natural = box["natural"][0] / box["natural"][1]
        assert box["fit"] in ("contain", "scale-down") or abs(box["width"] / box["height"] - natural) < 0.02, box


def choose(driver, wait, choice: str) -> None:
    """Click a radio button's choice."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    located = (By.CSS_SELECTOR, f"[data-testid='{choice}-radio-label']")
    wait.until(expected_conditions.element_to_be_clickable(located)).click()


def upload(driver, selector: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"{selector} input[type=file]").send_keys(str(path))


def drop_on(driver, selector: str, path: Path) -> None:
    """Drop a file on an element as a visitor dragging it from the desktop does."""
    from selenium.webdriver.common.by import By

    driver.execute_script(
        "const input = document.createElement('input'); input.type = 'file'; input.id = 'drag-source';"
        "input.style.display = 'none'; document.body.appendChild(input);"
    )
    driver.find_element(By.CSS_SELECTOR, "#drag-source").send_keys(str(path))
    driver.execute_script(
        """const target = document.querySelector(arguments[0]);
        const files = new DataTransfer(); files.items.add(document.querySelector('#drag-source').files[0]);
        for (const type of ['dragenter', 'dragover', 'drop'])
          target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: files}));
        document.querySelector('#drag-source').remove();""",
        selector,
    )


# ------------------------------------------------------------------------------------------------ generate
def test_generated_images_are_shown_whole_with_nothing_over_them(tarflow_server, browser, tmp_path):
    wait = open_page(browser, tarflow_server)
    assert browser.title == "TarFlow demo"
    assert "TarFlow: a normalizing flow that draws" in page_text(browser)
    assert not image_boxes(browser, "#samples img")
    generate(browser, wait, 4)  # the default request
    assert_shown_whole(settled_boxes(browser, "#samples img"), 4)
    wait.until(lambda d: image_boxes(d, "#trajectory img"))
    assert_shown_whole(settled_boxes(browser, "#trajectory img"), 1)  # not clipped under its label
    for selector in ("#samples", "#trajectory"):
        assert not browser.execute_script(COVERED, selector), selector  # no label, caption or button on a picture
    save_screenshot(browser, tmp_path, "spaces-demo-generate.png")


def test_sixteen_images_show_in_whole_rows(tarflow_server, browser, tmp_path):
    wait = open_page(browser, tarflow_server)
    type_into(field(browser, "Number of images"), "16")
    generate(browser, wait, 16)
    assert_shown_whole(settled_boxes(browser, "#samples img"), 16)
    assert not browser.execute_script(COVERED, "#samples")
    save_screenshot(browser, tmp_path, "spaces-demo-16-images.png")


def test_a_single_result_is_shown_whole_and_large(starflow_server, browser, tmp_path):
    """STARFlow's default request is one image: shown whole (not a zoomed slice of it), and not as a thumbnail."""
    from selenium.webdriver.common.by import By

    wait = open_page(browser, starflow_server)
    assert field(browser, "Guidance scale").get_attribute("value") == "1"
    generate(browser, wait, 1)
    (box,) = settled_boxes(browser, "#samples img")
    assert_shown_whole([box], 1)
    gallery = browser.find_element(By.CSS_SELECTOR, "#samples").rect
    assert box["width"] <= gallery["width"] and box["width"] >= gallery["width"] / 3, (box, gallery)
    save_screenshot(browser, tmp_path, "spaces-demo-starflow-one-image.png")


def test_a_refusal_stays_and_leaves_every_panel_as_it_was(tarflow_server, browser, tmp_path):
    """A refused request (an unknown class) shows its message until the visitor closes it, and leaves the samples
    of the previous request on the page: no panel is covered by Gradio's red "Error" badge."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait = open_page(browser, tarflow_server)
    generate(browser, wait, 4)
    before = browser.find_element(By.CSS_SELECTOR, "#timing").text
    box = browser.find_element(By.CSS_SELECTOR, "input[aria-label^='Class']")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("pentagon", Keys.ENTER)
    browser.find_element(By.TAG_NAME, "h1").click()  # leave the field: the typed value is kept
    browser.find_element(By.CSS_SELECTOR, "#generate-button").click()
    message = "unknown class name 'pentagon'"
    wait.until(lambda d: message in page_text(d))
    time.sleep(TOAST_SECONDS + 2)
    assert message in page_text(browser)  # still there after Gradio's default toast would have gone
    save_screenshot(browser, tmp_path, "spaces-demo-error-keeps-outputs.png")
    for selector in ("#samples", "#timing", "#trajectory"):
        assert "Error" not in browser.find_element(By.CSS_SELECTOR, selector).text, selector
    assert len(image_boxes(browser, "#samples img")) == 4
    assert browser.find_element(By.CSS_SELECTOR, "#timing").text == before


def test_newton_is_capped_before_the_click_and_each_sampler_explained(tarflow_server, browser, tmp_path):
    """Picking the newton sampler at the default 4 images: the estimate says how many fit and the number of
    images drops to that before any click, so Generate succeeds; block_jacobi says what it is."""
    from selenium.webdriver.common.by import By

    wait = open_page(browser, tarflow_server)
    assert "Expected time for 4 image(s)" in browser.find_element(By.CSS_SELECTOR, "#estimate").text
    browser.find_element(By.XPATH, "//button[contains(., 'Advanced')]").click()
    choose(browser, wait, "newton")
    wait.until(lambda d: "at most" in d.find_element(By.CSS_SELECTOR, "#estimate").text)
    estimate = browser.find_element(By.CSS_SELECTOR, "#estimate").text
    fit = int(re.search(r"at most (\d+) image", estimate).group(1))
    assert 0 < fit < 4 and "rows" not in estimate
    count = field(browser, "Number of images")
    assert int(count.get_attribute("value")) == fit and int(count.get_attribute("max")) == fit
    assert "newton" in browser.find_element(By.CSS_SELECTOR, "#sampler-help").text
    save_screenshot(browser, tmp_path, "spaces-demo-newton-capped.png")
    generate(browser, wait, fit)
    assert "Error" not in page_text(browser)
    choose(browser, wait, "block_jacobi")
    wait.until(lambda d: "approximate" in d.find_element(By.CSS_SELECTOR, "#sampler-help").text)
    assert field(browser, "block size").get_attribute("value") == "16"  # its own option, at its default


# ---------------------------------------------------------------------------------------------- likelihood
def test_a_huge_upload_is_refused_at_once_in_tarflow_mode(tarflow_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    huge = tmp_path / "huge.png"
    PIL.Image.new("L", (5000, 5000), 255).save(huge)
    wait = open_page(browser, tarflow_server, "Likelihood")
    click_tab(browser, "Upload")
    start = time.perf_counter()
    upload(browser, "#upload", huge)
    wait.until(lambda d: "too large: at most 4096x4096 pixels" in page_text(d))
    assert time.perf_counter() - start < 5
    wait.until(lambda d: not image_boxes(d, "#upload img"))  # the field is cleared
    bits = browser.find_element(By.CSS_SELECTOR, "#bits textarea, #bits input")
    assert bits.get_attribute("value") == "" and "not scored" in bits.get_attribute("placeholder")
    save_screenshot(browser, tmp_path, "spaces-demo-huge-upload.png")


def test_the_drawing_pad_draws_at_once_and_checks_a_dropped_file(tarflow_server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    wait = open_page(browser, tarflow_server, "Likelihood")
    bits = browser.find_element(By.CSS_SELECTOR, "#bits textarea, #bits input")
    assert bits.get_attribute("value") == ""  # empty, not 0, before scoring
    canvas = browser.find_element(By.CSS_SELECTOR, "#drawing canvas")
    strokes = ActionChains(browser).move_to_element_with_offset(canvas, -40, -60).click_and_hold()
    strokes.move_by_offset(10, 40).move_by_offset(10, 40).move_by_offset(10, 40).release().perform()
    browser.find_element(By.CSS_SELECTOR, "#analyze-button").click()
    wait.until(lambda d: re.fullmatch(r"\d+\.\d{4}", bits.get_attribute("value") or ""))
    save_screenshot(browser, tmp_path, "spaces-demo-drawing-scored.png")
    not_an_image = tmp_path / "digit.png"
    not_an_image.write_text("this is not a PNG")
    click_tab(browser, "Draw")
    drop_on(browser, "#drawing canvas", not_an_image)
    wait.until(lambda d: "could not read the upload as an image" in page_text(d))


def test_examples_are_clickable_and_scored(tarflow_server, browser):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, tarflow_server, "Likelihood")
    click_tab(browser, "Upload")
    examples = browser.find_elements(By.XPATH, "//*[contains(., 'Examples (click one)')]/following::button[.//img]")
    assert len(examples) >= 2
    examples[0].click()
    wait.until(lambda d: image_boxes(d, "#upload img"))
    browser.find_element(By.CSS_SELECTOR, "#analyze-button").click()
    bits = browser.find_element(By.CSS_SELECTOR, "#bits textarea, #bits input")
    wait.until(lambda d: re.fullmatch(r"\d+\.\d{4}", bits.get_attribute("value") or ""))


def test_a_huge_upload_in_starflow_mode_leaves_the_ranking_as_it_was(starflow_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    picture = tmp_path / "picture.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(picture)
    huge = tmp_path / "huge.png"
    PIL.Image.new("RGB", (5000, 5000), "white").save(huge)
    wait = open_page(browser, starflow_server, "Likelihood")
    upload(browser, "#upload", picture)
    wait.until(lambda d: image_boxes(d, "#upload img"))
    browser.find_element(By.CSS_SELECTOR, "#rank-button").click()
    wait.until(lambda d: "Best caption" in d.find_element(By.CSS_SELECTOR, "#rank-details").text)
    panels = ("#rank-input", "#ranking", "#rank-details")
    before = [browser.find_element(By.CSS_SELECTOR, selector).text for selector in panels]
    upload(browser, "#upload", huge)
    wait.until(lambda d: "too large" in page_text(d))
    time.sleep(1)
    after = [browser.find_element(By.CSS_SELECTOR, selector).text for selector in panels]
    assert after == before and not any("Error" in text for text in after)
    assert len(image_boxes(browser, "#rank-input img")) == 1  # the model input of the last ranking, still shown
    save_screenshot(browser, tmp_path, "spaces-demo-starflow-huge-upload.png")


def test_interpolation_shows_only_the_inputs_of_its_mode(tarflow_server, browser):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, tarflow_server, "Interpolation")

    def shown(label: str) -> bool:
        return any(e.is_displayed() for e in browser.find_elements(By.XPATH, f"//*[normalize-space(text())='{label}']"))

    assert shown("Seed A") and not shown("Image A")
    choose(browser, wait, "two images")
    time.sleep(1)
    assert shown("Image A") and not shown("Seed A")


# --------------------------------------------------------------------------------------------------- phone
def test_on_a_phone_generate_is_in_the_first_screen_and_every_image_shows(tarflow_server, phone, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(phone, tarflow_server)
    button = phone.find_element(By.CSS_SELECTOR, "#generate-button").rect
    height = phone.execute_script("return window.innerHeight")
    assert button["y"] + button["height"] <= height, (button, height)  # no scrolling past the intro
    save_screenshot(phone, tmp_path, "spaces-demo-phone.png")
    generate(phone, wait, 4)
    assert_shown_whole(settled_boxes(phone, "#samples img"), 4)
    assert_shown_whole(settled_boxes(phone, "#trajectory img"), 1)
    assert not phone.execute_script(COVERED, "#samples")
    phone.execute_script("document.querySelector('#samples').scrollIntoView()")
    save_screenshot(phone, tmp_path, "spaces-demo-phone-samples.png")
