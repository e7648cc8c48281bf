"""Fixtures of the console tests: Chromium (installed by the set-up when missing, as the
README's test command runs it) driven by Playwright; helpers live in uikit.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # no test may reach a network

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    from uikit import find_or_install_chromium

    try:
        return find_or_install_chromium()
    except RuntimeError as e:
        pytest.fail(f"the console tests need a headless Chromium: {e}", pytrace=False)


@pytest.fixture(scope="session")
def browser(chromium_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console tests drive Chromium with Playwright, which is not installed; "
                    "`pip install -e .[test]` installs it", pytrace=False)
    from uikit import CHROMIUM_ARGS

    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        except Exception as e:   # noqa: BLE001 - a missing library, a broken install: say which
            pytest.fail(f"Chromium at {chromium_path} did not start under Playwright: {e}", pytrace=False)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own cookies and session storage), 1280 pixels wide; an uncaught
    script error in it fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    context.close()
    assert not errors, f"the console's scripts raised: {errors}"


@pytest.fixture(scope="session")
def artifacts_dir() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS
