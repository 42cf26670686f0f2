"""The dashboard and the inspector in a real browser: Debian's headless Chromium, driven by selenium.

A relay, an agent (real processes) and an upstream; the test opens the dashboard and sees the agent appear,
sends requests through the tunnel and sees them in the inspector (the delay is printed), opens one and reads a redacted
header, replays it and sees the replayed row. Screenshots of each page go to the test's temporary directory.

Chromium and chromedriver come from the distribution's packages (.ci/run installs them). Outside CI (env CI
unset) the test is skipped when they are absent; in CI it must run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from .procs import http_client, run_agent, run_relay
from .test_dashboard import ADMIN_TOKEN, admin_url
from .upstream import Upstream

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not os.environ.get("CI"):
    pytest.skip(
        "Chromium and chromedriver are not installed (.ci/run installs them)", allow_module_level=True
    )

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.e2e

T = TypeVar("T")
# Every wait is bounded only so that a broken page fails instead of hanging: the page's promise (a finished
# exchange shows within 2 s: the event stream ticks once a second) is printed, not asserted, since a busy
# machine's timing must not fail a test.
PATIENCE = 15.0


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    )
    try:
        yield driver
    finally:
        driver.quit()


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Selenium blocks: run it in a thread, so the in-process upstream keeps answering meanwhile."""
    return await trio.to_thread.run_sync(fn, *args)


def wait_text(driver: Any, selector: str, text: str, seconds: float = PATIENCE) -> None:
    WebDriverWait(driver, seconds).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))


def screenshot(driver: Any, path: Path, width: int = 1280) -> None:
    driver.set_window_size(width, 1000)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height + 40, 500), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)


async def test_dashboard_and_inspector_in_chromium(upstream: Upstream, tmp_path: Path) -> None:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "CI installs chromium and chromium-driver (.ci/run)"  # noqa: ASYNC240
    token = "tok-browser-0123456789"
    relay_args = ("--admin", "127.0.0.1:0", "--inspect", "50", "--admin-token", ADMIN_TOKEN)
    async with run_relay(token, extra_args=relay_args) as relay:
        base = await admin_url(relay)
        with chromium(tmp_path / "profile") as driver:
            # The token guards the pages: the login form first.
            await off_loop(driver.get, base + "/")
            await off_loop(wait_text, driver, "h1", "rtunnel admin")
            await off_loop(screenshot, driver, tmp_path / "login.png", 640)
            field = await off_loop(driver.find_element, By.ID, "token")
            await off_loop(field.send_keys, ADMIN_TOKEN + "\n")
            await off_loop(wait_text, driver, "#live", "live")
            await off_loop(wait_text, driver, "#links-title", "Agents connected: 0")
            agent_args = ("--admin", "127.0.0.1:0")
            allow = ["GET /**", "POST /count/*"]
            async with run_agent(
                relay.agents_url, upstream.url, token=token, allow=allow, extra_args=agent_args
            ) as agent:
                # The agent appears without a reload.
                await off_loop(wait_text, driver, "#links-title", "Agents connected: 1")
                async with http_client(relay.http_url) as client:
                    for i in range(3):
                        assert (
                            await client.get(f"/echo/page-{i}", headers={"Authorization": "Bearer s3cr3t"})
                        ).status_code == 200
                    assert (await client.get("/status/502")).status_code == 502
                    assert (
                        await client.post("/count/browser", content=b'{"password": "pw"}')
                    ).status_code == 200
                    assert (await client.delete("/echo/not-allowed")).status_code == 403
                await off_loop(wait_text, driver, "#errors", "502")
                await off_loop(screenshot, driver, tmp_path / "dashboard.png")
                await off_loop(screenshot, driver, tmp_path / "dashboard-narrow.png", 400)
                # The agent's own dashboard (loopback, no token): its allowlist and what it refused.
                await off_loop(driver.get, await admin_url(agent) + "/")
                await off_loop(wait_text, driver, "#allowlist", "POST /count/*")
                await off_loop(wait_text, driver, "#refusals", "DELETE /echo/not-allowed")
                await off_loop(wait_text, driver, "#links-title", "Relays connected: 1")
                await off_loop(screenshot, driver, tmp_path / "agent-dashboard.png")

                await off_loop(driver.get, base + "/inspector")
                await off_loop(wait_text, driver, "#live", "live")
                async with http_client(relay.http_url) as client:
                    response = await client.get(
                        "/echo/fresh?api_key=k",
                        headers={"Authorization": "Bearer s3cr3t", "X-Request-Id": "fresh-1"},
                    )
                    assert response.status_code == 200
                answered = time.monotonic()
                await off_loop(wait_text, driver, "#exchanges tbody", "fresh-1")
                print(f"exchange shown in the inspector {time.monotonic() - answered:.2f} s after its answer")
                rows = await off_loop(driver.find_elements, By.CSS_SELECTOR, "#exchanges tbody tr")
                assert len(rows) == 7
                # The status filter keeps only the 5xx row.
                select = Select(await off_loop(driver.find_element, By.ID, "filter-status"))
                await off_loop(select.select_by_visible_text, "5xx")
                await off_loop(wait_text, driver, "#count", "1 shown of 7")
                await off_loop(select.select_by_visible_text, "any")
                await off_loop(wait_text, driver, "#count", "7 shown of 7")

                row = await off_loop(
                    driver.find_element, By.XPATH, "//table[@id='exchanges']//tr[td[contains(., 'fresh-1')]]"
                )
                await off_loop(row.click)
                await off_loop(wait_text, driver, "#detail-title", "/echo/fresh")
                headers = await off_loop(lambda: driver.find_element(By.ID, "request-headers").text)
                assert "Authorization [redacted]" in headers
                assert "s3cr3t" not in headers
                title = await off_loop(lambda: driver.find_element(By.ID, "detail-title").text)
                assert "api_key=%5Bredacted%5D" in title
                await off_loop(screenshot, driver, tmp_path / "inspector-detail.png")

                await off_loop(driver.find_element(By.ID, "replay").click)
                await off_loop(wait_text, driver, "#replay-result", "sent again")
                await off_loop(wait_text, driver, "#exchanges tbody", "replay of #")
                replayed = await off_loop(lambda: driver.find_element(By.CSS_SELECTOR, ".replay-mark").text)
                assert replayed.startswith("replay of #")
                await off_loop(screenshot, driver, tmp_path / "inspector.png")

                # A POST asks first: dismissing the dialog sends nothing.
                row = await off_loop(
                    driver.find_element,
                    By.XPATH,
                    "//table[@id='exchanges']//tr[td[contains(., '/count/browser')]]",
                )
                await off_loop(row.click)
                await off_loop(wait_text, driver, "#detail-title", "POST /count/browser")
                await off_loop(driver.find_element(By.ID, "replay").click)
                alert = await off_loop(lambda: WebDriverWait(driver, PATIENCE).until(ec.alert_is_present()))
                assert "not idempotent" in alert.text
                await off_loop(alert.dismiss)
                assert upstream.counts["browser"] == 1
                await off_loop(driver.find_element(By.ID, "replay").click)
                alert = await off_loop(lambda: WebDriverWait(driver, PATIENCE).until(ec.alert_is_present()))
                await off_loop(alert.accept)
                await off_loop(wait_text, driver, "#replay-result", "sent again")
    assert upstream.counts["browser"] == 2
    for name in (
        "login",
        "dashboard",
        "dashboard-narrow",
        "agent-dashboard",
        "inspector",
        "inspector-detail",
    ):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
