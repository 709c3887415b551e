"""The read policy: one canonical form per location, then one decision (``workers.uri_policy``).

Every spelling below reached another tenant's artifacts through the old string-prefix check."""

from __future__ import annotations

import os

import pytest

from workers.run import SpecError, prepare
from workers.spec import JobSpec
from workers.uri_policy import LocationRefused, ReadPolicy, canonical_uri

from .conftest import tiny_spec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("s3://bucket/./a//b/", "s3://bucket/a/b"),
        ("S3://Bucket/a/./b", "s3://bucket/a/b"),
        ("s3://bucket", "s3://bucket"),
        ("/x/./y//z/../w", "/x/y/w"),
        ("file:///x/y/../z", "/x/z"),
        ("builtin:digits", "builtin:digits"),
    ],
)
def test_canonical_forms(uri: str, want: str) -> None:
    assert canonical_uri(uri) == want


@pytest.mark.parametrize(
    "uri",
    [
        "relative/path",
        "file://host/x",
        "http://example.com/x",
        "s3://bucket/a/../b",
        "s3:///key",
        " /x",
        "/x\n",
        "/x\\..\\y",
    ],
)
def test_uris_without_a_canonical_form_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        canonical_uri(uri)


def _local_bypasses(root: str, data_dir: str) -> list[str]:
    victim = f"{root}/tenant-a/gm-1/model.safetensors"
    return [
        victim,
        f"{root}/./tenant-a/gm-1/model.safetensors",
        f"{data_dir}/./artifacts/tenant-a/gm-1/model.safetensors",
        f"{data_dir}//artifacts/tenant-a/gm-1",
        f"file://{root}/../artifacts/tenant-a",
        f"/proc/self/root{victim}",
        root,  # the root itself, no trailing slash
        data_dir,  # a folder that contains the root
        f"{data_dir}/greenmim.db",
        "/",
    ]


def test_local_bypasses_are_refused(tmp_path) -> None:
    data_dir = tmp_path / "data"
    root = data_dir / "artifacts"
    (root / "tenant-a" / "gm-1").mkdir(parents=True)
    (tmp_path / "link").symlink_to(root / "tenant-a")
    policy = ReadPolicy.of(str(root), [str(data_dir)])
    for uri in [*_local_bypasses(str(root), str(data_dir)), f"{tmp_path}/link/gm-1"]:
        with pytest.raises(LocationRefused, match="finetune.init_from"):
            policy.check(uri, "finetune.init_from")
    (tmp_path / "datasets").mkdir()
    assert policy.check(f"file://{tmp_path}/datasets/./x", "data.uri") == f"{tmp_path}/datasets/x"


def test_s3_bypasses_are_refused() -> None:
    policy = ReadPolicy.of("s3://bucket/artifacts")
    for uri in [
        "s3://bucket/./artifacts/tenant-a/gm-1/model.safetensors",
        "s3://bucket//artifacts/tenant-a",
        "S3://BUCKET/artifacts/tenant-a",
        "s3://bucket/artifacts",
        "s3://bucket",
        "s3://bucket/x/../artifacts/tenant-a",
    ]:
        with pytest.raises(LocationRefused, match="data.uri"):
            policy.check(uri, "data.uri")
    assert policy.check("s3://bucket/artifacts-public/x", "data.uri") == (
        "s3://bucket/artifacts-public/x"
    )
    assert policy.check("s3://datasets/imagenet/", "data.uri") == "s3://datasets/imagenet"


def test_allowed_prefixes_are_compared_canonically(tmp_path) -> None:
    policy = ReadPolicy.of("s3://bucket/artifacts", allowed_prefixes=["s3://data/ok"])
    assert policy.check("s3://data/./ok/x", "data.uri") == "s3://data/ok/x"
    for uri in ["s3://data/okx", "s3://data/ok/../secret", f"{tmp_path}/x"]:
        with pytest.raises(LocationRefused, match="data.uri"):
            policy.check(uri, "data.uri")


def test_workers_check_again_without_the_service(tmp_path) -> None:
    """``prepare`` (run by the Ray job) refuses what the service would, for both fields."""
    root = tmp_path / "data" / "artifacts"
    victim = root / "tenant-a" / "gm-1"
    victim.mkdir(parents=True)
    (victim / "model.safetensors").write_bytes(b"weights of tenant-a")
    os.symlink(victim, tmp_path / "innocent")
    policy = ReadPolicy.of(str(root), [str(tmp_path / "data")])
    ft = JobSpec.model_validate(
        tiny_spec("finetune", finetune={"init_from": f"{tmp_path}/innocent/model.safetensors"})
    )
    with pytest.raises(SpecError) as e:
        prepare(ft, str(root), "tenant-b", "gm-2", policy=policy)
    assert e.value.field == "finetune.init_from" and "job:<id>" in e.value.message
    data = JobSpec.model_validate(tiny_spec(data={"uri": f"{root}/./tenant-a"}))
    with pytest.raises(SpecError) as e:
        prepare(data, str(root), "tenant-b", "gm-3", policy=policy)
    assert e.value.field == "data.uri"
    assert not (root / "tenant-b").exists()
