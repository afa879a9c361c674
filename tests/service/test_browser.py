"""What a Prefect and MLflow user sees, in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium): the demo deployment's model version page in MLflow and
its flow run page in Prefect, each linking to the other.

One deployment run of the session's stack (``conftest.stack``) with a dotted-key override, then
three pages: the model version (description, metrics, alias, link to the Prefect run), the Prefect
run it links to (the run's name, a link to the MLflow run) and that MLflow run (its registered
model, its description's link back to Prefect).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import Stack, read_flow_run

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_SECONDS = 60


@pytest.fixture(scope="module")
def browser() -> Any:
    """Headless Chromium through its WebDriver; skipped, with the fix, where Debian's packages are missing."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} and {CHROMEDRIVER} are missing: `make setup` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_SECONDS)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo_run(stack: Stack) -> Any:
    """A run of quantize/demo that changes one setting by dotted key, as `--param overrides=...` sends it."""
    run = stack.run('overrides={"eval.max_windows": 2}')
    assert run.state.type.value == "COMPLETED", run.state.message
    return run


def _text(driver: Any, *wanted: str) -> str:
    """The page's visible text once it shows every string of ``wanted`` (fails after PAGE_SECONDS, naming them)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d: Any) -> str | bool:
        body = d.find_element("tag name", "body").text
        return body if all(w in body for w in wanted) else False

    try:
        return WebDriverWait(driver, PAGE_SECONDS, poll_frequency=0.5).until(shown)
    except TimeoutException:
        body = driver.find_element("tag name", "body").text
        raise AssertionError(f"{driver.current_url} never showed {[w for w in wanted if w not in body]}; it shows:\n"
                             f"{body[:3000]}") from None


def _link(driver: Any, match: Any, what: str) -> str:
    """The href of the first link on the page for which ``match(href)`` holds (waits for it)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d: Any) -> str | bool:
        hrefs = [a.get_attribute("href") or "" for a in d.find_elements("tag name", "a")]
        return next((h for h in hrefs if match(h)), False)

    try:
        return WebDriverWait(driver, PAGE_SECONDS, poll_frequency=0.5).until(found)
    except TimeoutException:
        hrefs = sorted({a.get_attribute("href") or "" for a in driver.find_elements("tag name", "a")})
        raise AssertionError(f"{driver.current_url} has no link to {what}; its links: {hrefs}") from None


def test_model_version_and_prefect_run_pages_describe_the_run_and_link_each_other(
        stack: Stack, demo_run: Any, browser: Any) -> None:
    result = stack.flow_result(demo_run)
    version, run_id, metrics = result["model_version"], result["mlflow_run_id"], result["metrics"]
    prefect_ui, name = stack.prefect_api.removesuffix("/api"), read_flow_run(str(demo_run.id)).name
    assert name.startswith("demo-model@") and name.endswith("-nvfp4-max-kvfp8"), f"the run's name says what ran: {name}"
    parent = stack.mlflow_client().get_run(run_id)
    assert parent.data.params["eval.max_windows"] == "2", "the dotted-key override reached the run"
    assert parent.info.run_name == name, "the same name in both UIs"

    browser.get(f"{stack.mlflow}/#/models/demo/versions/{version}")
    page = _text(browser, "Recipe", "nvfp4-max", "Audit", "passed", "NVFP4 vs BF16", "Evaluations", "candidate",
                 "perplexity_ratio", f"{metrics['perplexity_ratio']:.4g}", "bits per parameter")
    assert "checkpoint_status" in page and "present" in page
    prefect_run = _link(browser, lambda h: h == f"{prefect_ui}/runs/flow-run/{demo_run.id}", "the Prefect flow run")

    browser.get(prefect_run)
    _text(browser, name, "Completed")
    mlflow_run = _link(browser, lambda h: h.startswith(stack.mlflow) and h.endswith(f"/runs/{run_id}"), "the MLflow run")

    browser.get(mlflow_run)
    _text(browser, name, "Prefect flow run", "Registered models", "demo", f"v{version}")
    _link(browser, lambda h: h == prefect_run, "the Prefect flow run from the MLflow run's description")
