"""A real headless Chromium for the browser tests, driven by Playwright's sync API.

Chromium is the distribution's (``apt-get install chromium``), never a Playwright download:
``CHROMIUM`` names another binary. Screenshots go to ``test-artifacts/`` (gitignored), where CI
can keep them.
"""

import os
import shutil
from pathlib import Path

import pytest

from tests import services

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium_binary() -> str | None:
    wanted = os.environ.get("CHROMIUM")
    if wanted:
        return wanted if Path(wanted).exists() else shutil.which(wanted)
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module.

    Playwright's sync API keeps an asyncio event loop running in this thread, which makes
    Django refuse ORM calls here (``SynchronousOnlyOperation``). The tests and pytest-django's
    database teardown make only ordinary blocking calls, so the check is lifted while the
    browser is open, and only then.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        services.unavailable("chromium", "the `playwright` Python package is not installed")
    binary = chromium_binary()
    if binary is None:
        services.unavailable("chromium", "no chromium binary found")
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser, request):
    """A fresh browser page (its own cookies), 1280x900; on failure, a screenshot of where it
    stood is saved as ``test-artifacts/<test name>-failed.png``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    failed_before = request.session.testsfailed
    yield page
    # The test's own report is logged before its fixtures are torn down.
    if request.session.testsfailed > failed_before:
        screenshot(page, f"{request.node.name}-failed")
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot as ``test-artifacts/<name>.png``; returns its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
