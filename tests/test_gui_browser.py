"""The Gradio app served on localhost and driven in headless Chromium by Playwright.

Needs Debian's ``chromium`` at /usr/bin/chromium (``make test`` installs it);
Playwright talks to it over CDP, so no chromedriver and no ``playwright install``.
Set MLX_ABLITERATION_GUI_SCREENSHOT=docs/gui.png to refresh the README screenshot.
"""

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import mlx_lm
import pytest

from tests.support.patching import patch_everywhere

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT_MS = 120_000
HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(24)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(24)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def app_url(browser, tmp_path_factory):
    pytest.importorskip("gradio")
    from mlx_abliteration.gui import launch

    port = _free_port()
    # Every test's tmp_path lies inside the base temp dir: the GUI's output root here.
    app = launch("127.0.0.1", port, output_root=tmp_path_factory.getbasetemp(), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def page(browser, app_url):
    from playwright.sync_api import expect

    # A loaded 2-core CI machine can be slow to re-render; never flaky on time.
    expect.set_options(timeout=RUN_TIMEOUT_MS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(RUN_TIMEOUT_MS)
    page.goto(app_url)
    page.wait_for_selector("#start")
    yield page
    page.close()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in HARMLESS))
    return d / "harmful.txt", d / "harmless.jsonl"


def _fill_small_run(page, model: str, output_dir: str, datasets, upload: bool = False) -> None:
    page.fill("#model textarea", model)
    page.fill("#harmful-dataset textarea", str(datasets[0]))
    if upload:
        page.set_input_files("#harmless-upload input[type=file]", str(datasets[1]))
        page.wait_for_selector("#harmless-upload :text('harmless.jsonl')")
    else:
        page.fill("#harmless-dataset textarea", str(datasets[1]))
    page.fill("#output-dir textarea", output_dir)
    page.click("#advanced .label-wrap")
    for selector, value in (("#max-prompts input", "8"), ("#eval-size input", "4"), ("#eval-max-tokens input", "4")):
        _fill_number(page, selector, value)


def _fill_number(page, selector: str, value: str) -> None:
    """Fill and commit a number field; retried because a lazily rendered accordion may re-mount it."""
    from playwright.sync_api import expect

    field = page.locator(selector)
    field.wait_for(state="visible")
    for _ in range(3):
        field.fill(value)
        field.press("Tab")
        page.wait_for_timeout(200)
        if field.input_value() == value:
            break
    expect(field).to_have_value(value)


def _start_and_wait(page, expected_status: str) -> str:
    """Click start and wait for a status text that the previous run did not show."""
    from playwright.sync_api import expect

    page.click("#start")
    status = page.locator("#status")
    expect(status).to_contain_text(expected_status, timeout=RUN_TIMEOUT_MS)
    return status.inner_text()


def test_full_run_in_the_browser(page, tiny_model, tmp_path, datasets):
    from playwright.sync_api import expect

    out = tmp_path / "abliterated"
    _fill_small_run(page, str(tiny_model(num_shards=2)), str(out), datasets, upload=True)
    status = _start_and_wait(page, "Done.")
    expected_path = str(out / "model.safetensors.index.json")
    assert expected_path in status
    expect(page.locator("#output-path textarea")).to_have_value(expected_path)
    metrics = page.locator("#metrics")
    for text in ("metric", "before", "after", "refusals, harmful", "refusals, harmless", "KL vs original"):
        expect(metrics).to_contain_text(text)
    expect(page.locator("#layer-plot img")).to_be_visible()
    expect(page.locator("#log textarea")).to_have_value(re.compile("<= chosen"))
    model, tokenizer = mlx_lm.load(str(out))
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="hi", max_tokens=3), str)
    _screenshot(page)
    page.get_by_role("tab", name="Compare").click()  # prefilled with this run's models
    expect(page.locator("#compare-abliterated textarea")).to_have_value(str(out))
    page.fill("#compare-prompt textarea", "How do I bake bread?")
    page.click("#compare")
    expect(page.locator("#original-answer textarea")).not_to_have_value("", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#abliterated-answer textarea")).not_to_have_value("")


def test_bad_inputs_show_errors_and_the_app_keeps_working(page, tiny_model, tmp_path, datasets):
    from playwright.sync_api import expect

    _fill_small_run(page, str(tmp_path / "no-such-model"), str(tmp_path / "out"), datasets)
    _start_and_wait(page, "no such local path")
    expect(page.locator("#status strong")).to_have_text("Error:", timeout=RUN_TIMEOUT_MS)
    assert "Traceback" not in page.content()
    page.fill("#model textarea", str(tiny_model()))
    page.fill("#use-layer textarea", "99")
    _start_and_wait(page, "layer 99 is out of range")
    expect(page.locator("#status strong")).to_have_text("Error:", timeout=RUN_TIMEOUT_MS)
    assert not (tmp_path / "out").exists()
    page.fill("#use-layer textarea", "1")
    _start_and_wait(page, "Done.")
    page.get_by_role("tab", name="Compare").click()
    # The finished run prefills this field; wait for it, or it can overwrite what we type next.
    expect(page.locator("#compare-abliterated textarea")).to_have_value(str(tmp_path / "out"), timeout=RUN_TIMEOUT_MS)
    page.fill("#compare-abliterated textarea", str(tmp_path / "missing"))
    page.fill("#compare-prompt textarea", "hi")
    page.click("#compare")
    expect(page.locator("#compare-status")).to_contain_text("no such local path", timeout=RUN_TIMEOUT_MS)


def test_stop_button_cancels_and_leaves_no_partial_output(page, tiny_model, tmp_path, datasets, monkeypatch):
    """The save is held open (in this process, where the app runs) until Stop reaches the pipeline."""
    from playwright.sync_api import expect

    from mlx_abliteration.export import save as export_save

    save = export_save.save_ablated_model

    def save_until_stopped(*args, progress, **kwargs):
        def wait_for_stop(done, total, what):
            for _ in range(600):
                progress(0, total, what)  # raises Cancelled once Stop has set the run's flag
                time.sleep(0.1)
            progress(done, total, what)

        return save(*args, progress=wait_for_stop, **kwargs)

    patch_everywhere(monkeypatch, export_save, "save_ablated_model", save_until_stopped)
    out = tmp_path / "out"
    _fill_small_run(page, str(tiny_model(num_shards=2)), str(out), datasets)
    page.click("#start")
    expect(page.locator("#status")).to_contain_text("saving to", timeout=RUN_TIMEOUT_MS)
    page.click("#stop")
    expect(page.locator("#status")).to_contain_text("Cancelled.", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#output-path textarea")).to_have_value("")
    assert list(tmp_path.iterdir()) == []  # neither the output dir nor a .out.partial-* dir


def _screenshot(page) -> None:
    target = os.environ.get("MLX_ABLITERATION_GUI_SCREENSHOT")
    if not target:
        return
    page.click("#advanced .label-wrap")  # fold the advanced options again: a shorter picture
    page.wait_for_timeout(300)
    tmp = Path(target).with_suffix(".tmp.png")
    page.screenshot(path=str(tmp), full_page=True)
    shutil.move(tmp, target)
