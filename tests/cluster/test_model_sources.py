"""Model sources the cluster can reach: an S3 prefix (moto on 127.0.0.1, endpoint and credentials from the standard
AWS environment) and a Hugging Face repo id at a pinned revision in a hand-built local HF cache (offline)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import boto3
import pytest

from cluster import models, sources
from cluster.backends import generator_builder
from cluster.models import ModelSourceError, check_source, etag_of, identity, resolve
from schemas.config import ConfigError, ExpertSpec
from tasks.generate import plan_expert

BUCKET = "zooter"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """boto3 client on moto; this process's AWS environment points at it; a private node cache."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("ZOOTER_CACHE", str(tmp_path / "node-cache"))
    return boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id=s3_server["key"],
                        aws_secret_access_key=s3_server["secret"], region_name="us-east-1")


def upload(client, local: Path) -> tuple[str, str]:
    """The model directory under a fresh prefix: (s3 url, prefix)."""
    prefix = f"models/{uuid.uuid4().hex[:8]}"
    for f in sorted(local.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{prefix}/", prefix


def test_s3_identity_is_the_listing_and_follows_a_changed_object(s3, tiny_models, tmp_path):
    url, prefix = upload(s3, tiny_models["lm_a"])
    first = identity(url)
    assert first.startswith("s3:") and identity(url) == first
    assert not (tmp_path / "node-cache").exists()  # listed, nothing downloaded
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b'{"changed": true}')
    assert identity(url) != first


def test_s3_client_is_made_once_per_aws_environment(s3, monkeypatch):
    # a new client parses botocore's data again (~0.2 s of CPU) and a run lists each model many times; the
    # listing stays current (the test above), and a changed environment gets a client of its own
    client = sources._s3fs()
    assert sources._s3fs() is client
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert sources._s3fs() is not client


def test_s3_copy_once_per_node_loads_like_the_local_directory(s3, tiny_models):
    url, prefix = upload(s3, tiny_models["lm_a"])
    expect = identity(url)
    spec = ExpertSpec(name="a", model=url, dtype="float32")
    local = generator_builder(plan_expert(spec.model_copy(update={"model": str(tiny_models["lm_a"])})))()
    remote = generator_builder(plan_expert(spec))()  # the builder carries the driver's identity; the actor copies
    prompts = ["What is 2 + 2?", "Name a colour."]
    assert remote.generate(prompts, max_new_tokens=6) == local.generate(prompts, max_new_tokens=6)
    copy = resolve(url, expect=expect)
    assert copy.parent == models.cache_root() / "s3" and (copy / models.MARKER).is_file()
    assert sorted(p.name for p in copy.iterdir() if p.name != models.MARKER) == \
        sorted(p.name for p in tiny_models["lm_a"].iterdir())
    # a second resolve on this node reuses the copy without touching S3: the objects are gone now
    for key in [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]:
        s3.delete_object(Bucket=BUCKET, Key=key)
    assert resolve(url, expect=expect) == copy


def test_s3_changed_after_fingerprint_is_refused(s3, tiny_models):
    url, prefix = upload(s3, tiny_models["lm_a"])
    expect = identity(url)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/model.safetensors", Body=b"not the fingerprinted weights")
    with pytest.raises(ModelSourceError, match=rf"{url}: the objects changed after this run fingerprinted them"):
        resolve(url, expect=expect)
    assert not (models.cache_root() / "s3").exists()  # refused before any copy: nothing to reuse later


def test_s3_multipart_objects_are_verified_by_their_multipart_etag(s3, tmp_path):
    prefix = f"models/{uuid.uuid4().hex[:8]}"
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b"{}")
    data = os.urandom(5 * 1024 * 1024 + 1000)  # S3's smallest part is 5 MiB
    up = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/w.bin")
    parts = [{"PartNumber": n + 1, "ETag": s3.upload_part(Bucket=BUCKET, Key=f"{prefix}/w.bin", PartNumber=n + 1,
                                                          UploadId=up["UploadId"], Body=chunk)["ETag"]}
             for n, chunk in enumerate([data[:5 * 1024 * 1024], data[5 * 1024 * 1024:]])]
    s3.complete_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/w.bin", UploadId=up["UploadId"],
                                 MultipartUpload={"Parts": parts})
    etag = s3.head_object(Bucket=BUCKET, Key=f"{prefix}/w.bin")["ETag"].strip('"')
    assert etag.endswith("-2")
    copy = resolve(f"s3://{BUCKET}/{prefix}")
    assert (copy / "w.bin").read_bytes() == data
    assert etag_of(copy / "w.bin", 5 * 1024 * 1024) == etag
    assert etag_of(copy / "w.bin", 4 * 1024 * 1024) != etag  # the part size matters: it is S3's, not a guess


def test_s3_empty_prefix_and_no_config(s3):
    with pytest.raises(ModelSourceError, match=r"s3://zooter/nothing-here/: no objects under this prefix"):
        check_source("s3://zooter/nothing-here/")
    s3.put_object(Bucket=BUCKET, Key="weights-only/model.safetensors", Body=b"x")
    with pytest.raises(ModelSourceError, match="no config.json"):
        check_source("s3://zooter/weights-only")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_models) -> Path:
    """The HF cache layout `models--org--tiny/{refs/main, snapshots/<commit>/...}`, built by hand."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_models["lm_a"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import: patch it too
    return repo / "snapshots" / COMMIT


@pytest.mark.parametrize("ref", ["org/tiny", "hf://org/tiny"])
@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_hub_id_resolves_offline_from_the_local_cache(hf_cache, ref, revision):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert identity(ref, revision) == f"hf:org/tiny@{COMMIT}"
    check_source(ref, revision)
    assert resolve(ref, revision, expect=f"hf:org/tiny@{COMMIT}") == hf_cache
    assert models.architectures(ref, revision) == (["LlamaForCausalLM"], 2)


def test_hub_id_problems(hf_cache):
    with pytest.raises(ConfigError, match=r"org/tiny: not a local directory; .* needs a pinned `revision`"):
        identity("org/tiny")
    with pytest.raises(ModelSourceError, match=r"org/tiny@v9: not in the local Hugging Face cache"):
        check_source("org/tiny", "v9")
    with pytest.raises(ModelSourceError, match=r"org/other@main: not in the local Hugging Face cache"):
        identity("org/other", "main")
    with pytest.raises(ModelSourceError, match=r"org/tiny: its weights here .* are not the ones the run"):
        resolve("org/tiny", "main", expect="hf:org/tiny@" + "f" * 40)


def test_local_and_packaged_identity_unchanged(tiny_models, tmp_path):
    assert models.kind(str(tiny_models["lm_a"])) == "local"
    assert identity(str(tiny_models["lm_a"])).startswith("files:")
    assert identity(str(tiny_models["lm_a"]), "v1") == "revision:v1"
    assert identity("/nowhere/x", "v1") == "revision:v1"  # as before: a label, no file read
    with pytest.raises(ModelSourceError, match="its weights here"):
        resolve(str(tiny_models["lm_a"]), expect=identity(str(tiny_models["lm_b"])))


@pytest.mark.parametrize("change,match", [
    ({"model": "s3://bkt/m/", "revision": "abc"}, r"revision: an s3:// model is pinned by its objects' ETags"),
    ({"model": "s3:///m"}, "names no bucket"),
    ({"model": "gs://bkt/m"}, "model sources are packaged:<name>, s3://"),
    ({"model": "hf://just-a-name"}, "not a Hugging Face repo id"),
])
def test_config_refuses_sources_that_cannot_work(change, match):
    with pytest.raises(ValueError, match=match):
        ExpertSpec.model_validate({"name": "a", "model": "packaged:gemma3-270m", **change})
