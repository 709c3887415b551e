"""A real headless Chromium under Selenium, for the dashboard tests.

Debian's ``chromium`` + ``chromium-driver`` (``scripts/test.sh`` installs them when missing and
it runs as root). Without them the browser tests skip, unless ``GREENMIM_REQUIRE_BROWSER=1``
(CI) makes that a failure."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skips (or fails, when required) if either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "no chromium/chromedriver (apt-get install chromium chromium-driver)"
    if os.environ.get("GREENMIM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"GREENMIM_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def start_chromium(profile: Path, downloads: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # we may run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console, CSP reports
    browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    browser.set_script_timeout(30)
    return browser


def until(what: str, fn: Callable[[], T | None], timeout: float = 60, every: float = 0.2) -> T:
    """Poll ``fn`` until it returns something truthy (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # the page is being redrawn under us; poll again
            last_error = e
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen in {timeout} s (last error: {last_error!r})")
