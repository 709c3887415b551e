"""The API routes the dashboard adds (previews, the state timeline, download links) and how
``/ui`` is served (CSP, no inline script, files shipped), on the unit harness: the FastAPI
app on a real SQLite file and real local-directory storage, the fake scheduler for Ray."""

from __future__ import annotations

import hashlib
import io
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from PIL import Image

from service.server.api.routes.ui import CSP, UI_DIR
from tests.service.conftest import Harness, problem_ok, write_fake_artifacts
from workers.export import write_previews
from workers.storage import open_root

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 2), color).save(buf, format="PNG")
    return buf.getvalue()


def test_previews_list_and_images_round_trip(harness: Harness) -> None:
    job = harness.submit().json()["id"]
    root = open_root(str(harness.tmp / "artifacts"))
    prefix = root.job_prefix("tenant-a", job)
    written = {
        "epoch-0001-sample_00.png": png((255, 0, 0)),
        "epoch-0001-sample_01.png": png((0, 255, 0)),
        "epoch-0002-sample_00.png": png((0, 0, 255)),
        "sample_00.png": png((9, 9, 9)),
    }
    write_previews(
        root.fs,
        prefix,
        [written["epoch-0001-sample_00.png"], written["epoch-0001-sample_01.png"]],
        1,
    )
    write_previews(root.fs, prefix, [written["epoch-0002-sample_00.png"]], 2)
    write_previews(root.fs, prefix, [written["sample_00.png"]])
    root.fs.create_dir(
        f"{prefix}/previews/epoch-0003"
    )  # an empty folder and stray files: not listed
    with root.fs.open_output_stream(f"{prefix}/previews/notes.txt") as f:
        f.write(b"x")

    r = harness.client.get(f"/v1/jobs/{job}/previews", headers=harness.h())
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [(i["name"], i["epoch"]) for i in items] == [
        ("epoch-0001-sample_00.png", 1),
        ("epoch-0001-sample_01.png", 1),
        ("epoch-0002-sample_00.png", 2),
        ("sample_00.png", None),
    ]
    for item in items:
        assert item["size"] == len(written[item["name"]])
        img = harness.client.get(item["url"], headers=harness.h())
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content == written[item["name"]]


def test_previews_are_tenant_checked_and_names_only_from_the_listing(harness: Harness) -> None:
    job = harness.submit().json()["id"]
    root = open_root(str(harness.tmp / "artifacts"))
    write_previews(root.fs, root.job_prefix("tenant-a", job), [png((1, 2, 3))], 1)
    url = f"/v1/jobs/{job}/previews"
    problem_ok(harness.client.get(url, headers=harness.h(harness.key_b)), 404)
    problem_ok(
        harness.client.get(f"{url}/epoch-0001-sample_00.png", headers=harness.h(harness.key_b)), 404
    )
    for name in ("..%2Fspec.json", "epoch-0001%2Fsample_00.png", "sample_00.png", "spec.json"):
        problem_ok(harness.client.get(f"{url}/{name}", headers=harness.h()), 404)
    assert harness.client.get(f"{url}/epoch-0001-sample_00.png").status_code == 401


def test_events_are_the_state_timeline(harness: Harness) -> None:
    job = harness.submit().json()["id"]
    harness.client.post(f"/v1/jobs/{job}/cancel", headers=harness.h())
    r = harness.client.get(f"/v1/jobs/{job}/events", headers=harness.h())
    assert r.status_code == 200
    events = r.json()["items"]
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "queued"),
        ("queued", "cancelled"),
    ]
    assert events[0]["at"] <= events[1]["at"]
    problem_ok(harness.client.get(f"/v1/jobs/{job}/events", headers=harness.h(harness.key_b)), 404)


def test_download_link_on_local_storage_is_the_api_route(harness: Harness) -> None:
    job = harness.submit().json()["id"]
    sums = write_fake_artifacts(str(harness.tmp / "artifacts"), "tenant-a", job)
    r = harness.client.get(f"/v1/jobs/{job}/checkpoints/epoch-0001/link", headers=harness.h())
    assert r.json() == {"url": f"/v1/jobs/{job}/checkpoints/epoch-0001", "presigned": False}
    data = harness.client.get(r.json()["url"], headers=harness.h()).content
    assert hashlib.sha256(data).hexdigest() == sums["state"]
    r = harness.client.get(
        f"/v1/jobs/{job}/checkpoints/final/link?file=config.json", headers=harness.h()
    )
    assert r.json()["url"] == f"/v1/jobs/{job}/checkpoints/final?file=config.json"
    problem_ok(
        harness.client.get(f"/v1/jobs/{job}/checkpoints/epoch-0002/link", headers=harness.h()), 404
    )
    problem_ok(
        harness.client.get(
            f"/v1/jobs/{job}/checkpoints/epoch-0001/link", headers=harness.h(harness.key_b)
        ),
        404,
    )


def test_ui_is_served_with_a_csp_and_no_inline_script(harness: Harness) -> None:
    c = harness.client
    shell = c.get("/ui/")
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    assert shell.headers["content-security-policy"] == CSP
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
    assert c.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    for path in ("static/js/app.js", "static/vendor/js-yaml/js-yaml.esm.min.mjs"):
        r = c.get(f"/ui/{path}")
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/javascript")
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in c.get("/healthz").headers
    # every script is a file; no inline handlers; no HTML built from strings in our modules
    html = shell.text
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"<script[^>]*>\s*[^<\s]", html) and not re.search(r"\son\w+=", html)
    for js in (UI_DIR / "static" / "js").rglob("*.js"):
        src = js.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in src, (js.name, sink)
    # the UI needs no key, the API still does
    assert c.get("/v1/jobs").status_code == 401


def test_ui_files_ship_in_the_package() -> None:
    """Every file under service/server/ui matches the package-data globs (a non-editable
    install has the dashboard), and each vendored library has its licence and version."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    globs = data["service"]
    files = [p.relative_to(ROOT / "service").as_posix() for p in UI_DIR.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), globs
    for lib in (UI_DIR / "static" / "vendor").iterdir():
        assert (lib / "LICENSE").is_file() and (lib / "VERSION").read_text().strip()
