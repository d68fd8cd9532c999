"""The demo in a real headless browser (Debian's chromium through selenium and /usr/bin/chromedriver): the page
loads, "Generate" puts images in the gallery, and a mistake shows a readable message. Screenshots are kept under
the test's tmp dir and copied to test-artifacts/ for people to look at.

Needs chromium, chromium-driver and selenium: `bash .ci/install-demo-deps` installs them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no traffic off loopback

import pytest
import torch
from conftest import random_model

from tarflow_hf import TarFlowPipeline

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "run `bash .ci/install-demo-deps` (installs chromium, chromium-driver and selenium)"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1900",
)
TIMEOUT = 45  # seconds for the page and for one generation, on a busy 2-core machine


def load_app():
    name = "tarflow_spaces_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "spaces_demo" / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on loopback with a tiny random model, chosen the way a deployment does: $TARFLOW_MODEL."""
    folder = tmp_path_factory.mktemp("browser-model") / "tiny"
    model = random_model(seed=2, id2label={0: "circle", 1: "square", 2: "triangle"})
    TarFlowPipeline(transformer=model).save_pretrained(folder)
    app = load_app()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TARFLOW_MODEL", str(folder))
        demo = app.build_demo()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"browser test needs {', '.join(missing)}: {INSTALL_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"browser test needs the selenium package: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # An explicit driver path: selenium then never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the browser wrote no screenshot"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / name)
    return path


def loaded_images(driver, selector: str) -> list[int]:
    """Natural widths of the fully loaded <img> elements under `selector`."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".filter(img => img.complete && img.naturalWidth > 0).map(img => img.naturalWidth);",
        selector,
    )


def test_generate_shows_images_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, TIMEOUT)
    button = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#generate-button")))
    assert browser.title == "TarFlow demo"
    assert "TarFlow: a normalizing flow that draws" in browser.find_element(By.TAG_NAME, "body").text
    assert not loaded_images(browser, "#samples img")
    button.click()
    # The default request is 4 images; the gallery shows each (enlarged to 192 px) once the server answers.
    wait.until(lambda driver: len(loaded_images(driver, "#samples img")) >= 4)
    wait.until(lambda driver: "image(s) in" in driver.find_element(By.CSS_SELECTOR, "#timing").text)
    wait.until(lambda driver: loaded_images(driver, "#trajectory img"))  # the last frame of the trajectory
    widths = loaded_images(browser, "#samples img")
    assert len(widths) == 4 and set(widths) == {192}, widths
    assert browser.find_element(By.CSS_SELECTOR, "#timing").text.startswith("4 image(s) in")
    screenshot = save_screenshot(browser, tmp_path, "spaces-demo-generate.png")
    assert screenshot.stat().st_size > 10_000


def test_a_mistake_shows_a_readable_message(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, TIMEOUT)
    tab = wait.until(expected_conditions.element_to_be_clickable((By.XPATH, "//button[@role='tab'][.='Likelihood']")))
    tab.click()
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#analyze-button"))).click()
    # Nothing drawn: the server answers with an error that the page shows as a toast.
    message = "no image: upload or draw one first"
    wait.until(lambda driver: message in driver.find_element(By.TAG_NAME, "body").text)
    save_screenshot(browser, tmp_path, "spaces-demo-error.png")


def test_an_error_keeps_the_previous_outputs(server, browser, tmp_path):
    """A refused request (an unknown class) shows its message and leaves the samples of the previous request on
    the page: no panel is covered by Gradio's red "Error" badge."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, TIMEOUT)
    button = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#generate-button")))
    button.click()
    wait.until(lambda driver: len(loaded_images(driver, "#samples img")) >= 4)
    before = browser.find_element(By.CSS_SELECTOR, "#timing").text
    assert before.startswith("4 image(s) in")
    box = browser.find_element(By.CSS_SELECTOR, "input[aria-label^='Class']")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("pentagon", Keys.ENTER)
    browser.find_element(By.TAG_NAME, "h1").click()  # leave the field: the typed value is kept
    button.click()
    message = "unknown class name 'pentagon'"
    wait.until(lambda driver: message in driver.find_element(By.TAG_NAME, "body").text)
    save_screenshot(browser, tmp_path, "spaces-demo-error-keeps-outputs.png")
    for selector in ("#samples", "#timing", "#trajectory"):
        assert "Error" not in browser.find_element(By.CSS_SELECTOR, selector).text, selector
    assert len(loaded_images(browser, "#samples img")) == 4
    assert browser.find_element(By.CSS_SELECTOR, "#timing").text == before
