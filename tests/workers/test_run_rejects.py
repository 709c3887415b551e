"""``python -m workers.run`` refuses bad jobs before Ray is imported, and creates nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workers.data import export_digits

from .conftest import tiny_spec

pytestmark = pytest.mark.unit

CASES = {
    "mask_unit": (tiny_spec(mim={"mask_unit": 8}), "mim.mask_unit"),
    "extra": (tiny_spec(extra_field=1), "extra_field"),
    "not_json": ('{"kind": "pretrain", ', "not valid JSON"),
    "no_data": (tiny_spec(data={"uri": "/nonexistent/dataset"}), "data.uri"),
    "batch": (  # known from the spec alone (max_samples)
        tiny_spec(train={"global_batch_size": 512}),
        "train.global_batch_size: the dataset gives at most 256 training images",
    ),
    "batch_listed": (  # known once the dataset is listed (the digits' own size)
        tiny_spec(data={"uri": "DIGITS", "max_samples": None}, train={"global_batch_size": 4096}),
        "train.global_batch_size: 1618 training images cannot fill one step",
    ),
    "no_job": (
        tiny_spec("finetune", finetune={"init_from": "job:missing"}),
        "finetune.init_from: job 'missing'",
    ),
    "no_file": (
        tiny_spec("finetune", finetune={"init_from": "/nonexistent/m.safetensors"}),
        "finetune.init_from",
    ),
    "bad_job_id": (tiny_spec(), "job_id"),
}

# one fresh interpreter runs main() on every case and reports whether Ray was ever imported
PROBE = """
import json, sys
import workers.run
out = {}
for name, args in json.loads(sys.argv[1]).items():
    out[name] = workers.run.main(args)
print(json.dumps({"rc": out, "ray_imported": "ray" in sys.modules}))
"""


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rejects")
    digits = export_digits(tmp / "digits")
    argv = {}
    for name, (spec, _) in CASES.items():
        spec_file = tmp / f"{name}.json"
        text = spec if isinstance(spec, str) else json.dumps(spec)
        spec_file.write_text(text.replace('"DIGITS"', json.dumps(str(digits))))
        job_id = "../escape" if name == "bad_job_id" else name
        argv[name] = ["--spec", str(spec_file), "--job-id", job_id, "--tenant", "t",
                      "--storage-root", str(tmp / "store"), "--address", "127.0.0.1:1"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"GREENMIM_CACHE_DIR": str(tmp / "cache"), "PATH": "/usr/bin:/bin"},
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report, out.stderr, tmp / "store"


def test_ray_is_never_imported_and_nothing_is_created(outcome):
    report, stderr, store = outcome
    assert report["ray_imported"] is False, stderr
    assert not store.exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_job_exits_2_naming_the_field(outcome, case):
    report, stderr, _ = outcome
    assert report["rc"][case] == 2
    needle = CASES[case][1]
    lines = [
        line for line in stderr.splitlines() if f"/{case}.json" in line or f"job {case} " in line
    ]
    if case == "bad_job_id":
        lines = [line for line in stderr.splitlines() if "../escape" in line]
    assert any(needle in line for line in lines), (needle, lines)
