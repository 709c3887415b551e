"""The dashboard in a real headless Chromium against the real local stack: the API as a
uvicorn process, a Ray head with token auth running the real workers, ``moto_server`` as S3
storage (so checkpoint downloads go through presigned URLs), a SQLite file.

One stack and one browser for the module; the tests run in file order and share the jobs.
Screenshots go to a temporary folder (its path is printed); ``docs/dashboard.png`` is one."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.stack.local import ApiServer, RayHead, S3Server, api_env
from tests.ui.browser import find_browser, start_chromium, until

pytestmark = pytest.mark.e2e

MODEL = "swin_micro_patch2_window4_64"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


@dataclass
class Stack:
    api: ApiServer
    key: str
    other_key: str
    shots: Path
    downloads: Path
    browser: Any
    jobs: dict[str, str] = field(default_factory=dict)

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.api.url, headers={"Authorization": f"Bearer {key or self.key}"}
        )

    def open(self, hash_route: str) -> None:
        self.browser.get(f"{self.api.url}/ui/{hash_route}")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.browser.save_screenshot(str(path))
        return path

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.browser.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.browser.find_elements(By.CSS_SELECTOR, selector)

    def state(self) -> str:
        return str(self.css(".job-head [data-state]").get_attribute("data-state"))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, ray_head: RayHead, s3_server: S3Server
) -> Iterator[Stack]:
    find_browser()  # skip (or fail) before starting anything
    from service.stack.admin import key_service, stack_settings

    data_dir = tmp_path_factory.mktemp("ui")
    env = api_env(data_dir, ray_head, s3_server, GREENMIM_RECONCILE_INTERVAL_S="0.5")
    keys = key_service(stack_settings(data_dir))
    key, other = str(keys.create("ui").key), str(keys.create("ui-other").key)
    api = ApiServer(data_dir, env).start()
    shots = tmp_path_factory.mktemp("screenshots")
    downloads = tmp_path_factory.mktemp("downloads")
    browser = start_chromium(tmp_path_factory.mktemp("chromium-profile"), downloads)
    print(f"\nscreenshots: {shots}")
    try:
        yield Stack(api, key, other, shots, downloads, browser)
    finally:
        browser.quit()
        api.stop()


def sign_in(s: Stack, key: str) -> None:
    s.open("#/jobs")
    until("the sign-in page", lambda: s.css("#api-key"))
    s.css("#api-key").send_keys(key)
    s.css("#sign-in").click()
    until("the job list", lambda: s.all("#jobs-table"))
    assert s.browser.current_url.endswith("#/jobs")
    assert key not in s.browser.current_url
    stored = s.browser.execute_script("return sessionStorage.getItem('greenmim.apiKey')")
    assert stored == key
    assert not s.browser.get_cookies()


def fill(s: Stack, loc: str, value: str) -> None:
    el = s.css(f'[id="spec-{loc}"]')
    el.clear()
    el.send_keys(value)


def all_metrics(s: Stack, job_id: str) -> list[dict[str, Any]]:
    with s.http() as c:
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 10000}
        while page := c.get(f"/v1/jobs/{job_id}/metrics", params=params).json()["items"]:
            out += page
            params["after_step"] = page[-1]["step"]
        return out


def test_sign_in_submit_watch_previews_succeed_download(stack: Stack) -> None:
    s = stack
    with s.http() as c:  # submitted now so that they run beside the watched job
        xss = c.post("/v1/jobs", json=failing_spec()).json()["id"]
        s.jobs["xss"] = xss
    sign_in(s, s.key)

    # -- submit a tiny pretrain job from the form
    s.open("#/submit")
    until("the submit form", lambda: s.css("#spec-model option"))
    from selenium.webdriver.support.ui import Select

    Select(s.css("#spec-model")).select_by_value(MODEL)
    for loc, value in {
        "data.max_samples": "96",
        "data.loader_workers": "0",
        "train.epochs": "3",
        "train.global_batch_size": "16",
        "resources.cpus_per_worker": "1",
    }.items():
        fill(s, loc, value)
    s.css("#submit").click()
    until("the job page", lambda: "#/jobs/gm-" in s.browser.current_url)
    job_id = s.browser.current_url.rsplit("/", 1)[-1]
    s.jobs["watched"] = job_id
    with s.http() as c:
        spec = c.get(f"/v1/jobs/{job_id}").json()["spec"]
    assert spec["train"]["epochs"] == 3 and spec["data"]["max_samples"] == 96

    # -- the loss chart gains points while the job runs
    seen: list[int] = []

    def watch() -> bool:
        points = int(s.css("#chart-loss").get_attribute("data-points"))
        if s.state() == "running" and points and (not seen or points > seen[-1]):
            seen.append(points)
        return s.state() in ("succeeded", "failed", "cancelled")

    until("the job to finish", watch, timeout=400, every=0.1)
    s.shot("job-finished")
    assert s.state() == "succeeded", s.css(".job-head").text
    with s.http() as c:  # the next test's job starts while this one checks the results
        s.jobs["cancelled"] = c.post("/v1/jobs", json=tiny_spec(epochs=200)).json()["id"]
    assert len(seen) >= 2, f"plotted points seen while running: {seen}"

    # -- every record arrived once, and the chart plots each value (the API's series)
    records = all_metrics(s, job_id)
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    want = len(steps) + sum(("train_loss" in r) + ("val_loss" in r) for r in epochs)
    until(
        "all points plotted", lambda: int(s.css("#chart-loss").get_attribute("data-points")) == want
    )
    assert int(s.css("#chart-lr").get_attribute("data-points")) == len(steps) > 0
    # (events written after a step's records, at the same step, are not streamed: the
    # stream's cursor is the step; the charts need only step and epoch records)
    received = int(s.css("section.charts").get_attribute("data-records"))
    assert len(steps) + len(epochs) <= received <= len(records)

    # -- previews: per epoch and at the end, each loaded from a blob: URL as the API serves it
    with s.http() as c:
        previews = c.get(f"/v1/jobs/{job_id}/previews").json()["items"]
        assert {p["epoch"] for p in previews} == {1, 2, 3, None}
        first = previews[0]
        png = Image.open(io.BytesIO(c.get(first["url"]).content))
    images = until(
        "the preview images to load",
        lambda: (
            (imgs := s.all("img.preview"))
            and len(imgs) == len(previews)
            and all(
                s.browser.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth", i
                )
                for i in imgs
            )
            and imgs
        ),
    )
    img = next(i for i in images if i.get_attribute("data-name") == first["name"])
    assert img.get_attribute("src").startswith("blob:")
    size = s.browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img
    )
    assert tuple(size) == png.size

    # -- the timeline, the log tail
    timeline = s.css("#timeline").text
    for state in ("queued", "starting", "running", "succeeded"):
        assert state in timeline
    until("the log tail", lambda: "epoch" in s.css("#logs").text)

    # -- download the final weights: the API answers with a presigned S3 URL, the browser
    # follows it without the key; the file on disk has the listed sha256
    row = until("the final checkpoint", lambda: s.css('tr[data-checkpoint="final"]'))
    listed = row.get_attribute("data-sha256")
    s.browser.execute_script("arguments[0].scrollIntoView()", row)
    row.find_element("css selector", "button.download").click()

    def downloaded() -> Path | None:
        done = [p for p in s.downloads.iterdir() if not p.name.endswith(".crdownload")]
        return done[0] if done and done[0].stat().st_size > 0 else None

    path = until("the download", downloaded, timeout=60)
    with s.http() as c:
        final = next(
            ck
            for ck in c.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
            if ck["name"] == "final"
        )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == listed == final["sha256"]
    primary = next(f for f in final["files"] if f["path"] == final["primary_file"])
    assert path.stat().st_size == primary["size"]
    s.browser.set_window_size(1400, 2300)  # the whole page: charts, previews, checkpoints
    s.browser.execute_script("window.scrollTo(0, 0)")
    s.shot("dashboard")
    s.browser.set_window_size(1400, 1100)


def test_stream_resumes_after_an_api_crash_then_cancel(stack: Stack) -> None:
    """The page's metric stream survives the API being SIGKILLed and restarted: it reconnects
    with Last-Event-ID, so after the job ends it has every step once (no gap, no repeat).
    Then the job is cancelled from its page."""
    s = stack
    job_id = s.jobs["cancelled"]  # submitted by the previous test
    s.open(f"#/jobs/{job_id}")
    until("the job to run", lambda: s.state() == "running", timeout=180)

    def points() -> int:
        return int(s.css("#chart-lr").get_attribute("data-points"))

    until("a first point", points, timeout=120)
    s.api.kill()
    s.api.start()
    before = points()
    until(
        "a reconnect",
        lambda: int(s.css("section.charts").get_attribute("data-connects")) >= 2,
        timeout=60,
    )
    until("points after the reconnect", lambda: points() > before, timeout=120)
    s.css("#cancel").click()
    until("the job to be cancelled", lambda: s.state() == "cancelled", timeout=120)
    assert not s.css("#cancel").is_displayed()
    with s.http() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        events = c.get(f"/v1/jobs/{job_id}/events").json()["items"]
    assert job["state"] == "cancelled" and (job["progress"]["epoch"] or 0) < 200
    assert [e["to_state"] for e in events][-2:] == ["cancelling", "cancelled"]
    until("the timeline", lambda: "cancelled" in s.css("#timeline").text)
    records = all_metrics(s, job_id)
    steps = [r for r in records if r["type"] == "step"]
    until("the last points", lambda: points() == len(steps))
    received = int(s.css("section.charts").get_attribute("data-records"))
    assert len(steps) <= received <= len(records)  # a replay from the start would exceed it


def test_bad_spec_shows_the_field_error_and_creates_nothing(stack: Stack) -> None:
    s = stack
    with s.http() as c:
        before = len(c.get("/v1/jobs", params={"limit": 200}).json()["items"])
    s.open("#/submit")
    until("the submit form", lambda: s.css("#spec-model option"))
    fill(s, "train.epochs", "0")
    fill(s, "data.uri", f"builtin:{XSS}")
    s.css("#submit").click()
    err = until("the field error", lambda: s.css('[data-error-for="train.epochs"]').text)
    assert "greater than or equal to 1" in err
    assert s.browser.current_url.endswith("#/submit")
    assert not s.all("#spec-form img, #spec-form script, #submit-errors img")
    s.shot("bad-spec")
    # the same spec as YAML: the errors are listed by field
    from selenium.webdriver.support.ui import Select

    Select(s.css("#spec-mode")).select_by_value("text")
    s.css("#spec-text").send_keys(
        f"kind: pretrain\nmodel: {MODEL}\ndata: {{uri: 'builtin:digits'}}\ntrain: {{epochs: 0}}\n"
    )
    s.css("#submit").click()
    until("the listed error", lambda: "train.epochs" in s.css("#text-errors").text)
    with s.http() as c:
        assert len(c.get("/v1/jobs", params={"limit": 200}).json()["items"]) == before


def test_user_text_is_shown_as_text(stack: Stack) -> None:
    """A job whose error message carries markup (its weights URI) shows it as text."""
    s = stack
    job_id = s.jobs["xss"]
    s.open(f"#/jobs/{job_id}")
    until("the job to fail", lambda: s.state() == "failed", timeout=300)

    def error_box() -> dict[str, Any] | None:
        # read in one script, so a redraw between two WebDriver calls cannot stale the element
        b = s.browser.execute_script(
            "const b = document.querySelector('#job-error');"
            "return b && {text: b.textContent, tags: b.querySelectorAll('img, script').length}"
        )
        return b if b and XSS in b["text"] else None

    box = until("the error text", error_box)
    assert box["tags"] == 0, box
    assert s.browser.execute_script("return window.__xss === undefined")
    spec = s.css("#spec").text  # JSON of the spec: the quotes come escaped, the tags as text
    assert "<script>window.__xss=2</script>" in spec and "<img src=x onerror=" in spec
    s.shot("xss-as-text")


def test_list_filters_compare_and_tenants(stack: Stack) -> None:
    s = stack
    watched, cancelled = s.jobs["watched"], s.jobs["cancelled"]
    s.open("#/jobs?state=succeeded")
    until("the filtered list", lambda: s.all(f'tr[data-job="{watched}"]'))
    assert not s.all(f'tr[data-job="{cancelled}"]') and not s.all(f'tr[data-job="{s.jobs["xss"]}"]')
    assert s.css("#f-succeeded").is_selected()

    s.open(f"#/compare?ids={watched},{cancelled}")
    chart = until(
        "the compare chart", lambda: s.css("#chart-compare .uplot") and s.css("#chart-compare")
    )
    want = sum(r["type"] == "step" for j in (watched, cancelled) for r in all_metrics(s, j))
    until("both curves", lambda: int(chart.get_attribute("data-points")) == want)
    assert chart.get_attribute("data-series") == "2"
    s.shot("compare")

    # another tenant: the job is a 404 in the UI as in the API
    s.css("#sign-out").click()
    sign_in(s, s.other_key)
    s.open(f"#/jobs/{watched}")
    problem = until("the not-found message", lambda: s.css(".problem").text)
    assert "Not found" in problem and watched in problem
    with s.http(s.other_key) as c:
        assert c.get(f"/v1/jobs/{watched}").status_code == 404
        assert c.get(f"/v1/jobs/{watched}/previews").status_code == 404

    # all along, the pages ran under the CSP without a violation (no inline script or style)
    console = [e["message"] for e in s.browser.get_log("browser")]
    assert console, "the browser's console log is not being collected"
    assert not [m for m in console if "Content Security Policy" in m], console
    # and the policy is enforced: an inline script added to the page does not run
    s.browser.execute_script(
        "const el = document.createElement('script');"
        "el.textContent = 'window.__inline = 1'; document.head.append(el);"
    )
    assert s.browser.execute_script("return window.__inline === undefined")
    assert any("Content Security Policy" in e["message"] for e in s.browser.get_log("browser"))


def tiny_spec(epochs: int) -> dict[str, Any]:
    return {
        "kind": "pretrain",
        "model": MODEL,
        "data": {"uri": "builtin:digits", "max_samples": 96, "loader_workers": 0},
        "train": {"epochs": epochs, "global_batch_size": 16},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpoint": {"keep_last": 1, "every_epochs": 1000},
    }


def failing_spec() -> dict[str, Any]:
    """Weights that do not exist: accepted at submit (only the read policy looks at the URI
    there), then the workers refuse the job with the URI in the message."""
    spec = tiny_spec(1)
    spec["kind"] = "finetune"
    spec["finetune"] = {"init_from": f"/nonexistent-greenmim-weights/{XSS}"}
    return spec
