"""storage: URIs on local disks and on S3.

Real: the filesystem, boto3 and its transfer manager talking HTTP to a real `moto_server` (multipart
uploads, paginated listings, ranged GETs). Emulated: S3 itself (moto), and a broken download stream,
made by closing the HTTP response under the reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage import readers, transfers


@pytest.fixture
def s3(moto_endpoint: str) -> S3Settings:
    return S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)


@pytest.fixture
def bucket(s3: S3Settings) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    storage.client(s3).create_bucket(Bucket=name)
    return name


def test_join_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.join("s3://b/p/", "x", "/y.json") == "s3://b/p/x/y.json"
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert storage.local_path("file:///data/x") == Path("/data/x")
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path))
    assert storage.local_path("pvc://claim/data/x") == tmp_path / "claim" / "data" / "x"
    with pytest.raises(storage.StorageError, match="hf:// cannot be read"):
        storage.local_path("hf://org/model")
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")


def test_local_fingerprint_write_and_upload(tmp_path: Path) -> None:
    data = Path(__file__).read_bytes()
    src = tmp_path / "src.txt"
    src.write_bytes(data)
    identity = storage.identify(str(src))
    assert identity.fingerprint == "sha256:" + hashlib.sha256(data).hexdigest()
    assert identity.size == len(data) and identity.pin is None
    with pytest.raises(storage.NotFound):
        storage.identify(str(tmp_path / "missing"))
    storage.write_text(str(tmp_path / "out" / "x.json"), '{"a": 1}')
    assert storage.read_text(str(tmp_path / "out" / "x.json")) == '{"a": 1}'
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.json"]  # no temp files left
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.bin").write_bytes(data)
    (tree / "_SUCCESS").write_bytes(b"")
    storage.upload_dir(tree, f"file://{tmp_path}/copy", marker="_SUCCESS")
    assert (tmp_path / "copy" / "sub" / "a.bin").read_bytes() == data
    assert storage.download_dir(str(tmp_path / "copy"), tmp_path / "unused") == tmp_path / "copy"


def test_s3_roundtrip_multipart_and_listing(
    tmp_path: Path, s3: S3Settings, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.MULTIPART_THRESHOLD_ENV, str(5 * 1024 * 1024))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024 + 7))
    uri = f"s3://{bucket}/data/big.bin"
    storage.upload_file(big, uri, s3)
    head = storage.client(s3).head_object(Bucket=bucket, Key="data/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), "11 MiB at a 5 MiB threshold: 3 parts"
    identity = storage.identify(uri, s3)
    assert identity.fingerprint == f"etag:{head['ETag'].strip(chr(34))}:{big.stat().st_size}"
    assert identity.pin == storage.Pin(head["ETag"])
    assert storage.size(uri, s3) == big.stat().st_size
    with storage.open_binary(uri, s3) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert storage.exists(uri, s3) and not storage.exists(uri + ".nope", s3)
    with pytest.raises(storage.NotFound, match="does not exist"):
        storage.open_binary(uri + ".nope", s3).read()
    storage.write_text(f"s3://{bucket}/data/x.json", '{"k": 1}', s3)
    assert json.loads(storage.read_text(f"s3://{bucket}/data/x.json", s3)) == {"k": 1}
    listed = sorted(rel for rel, _, _ in storage.list_objects(f"s3://{bucket}/data", s3))
    assert listed == ["big.bin", "x.json"]


def test_s3_stream_resumes_after_a_broken_connection(
    tmp_path: Path, s3: S3Settings, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    src = tmp_path / "p.bin"
    src.write_bytes(payload)
    uri = f"s3://{bucket}/p.bin"
    storage.upload_file(src, uri, s3)
    with storage.open_binary(uri, s3) as f:
        first = f.read(1024 * 1024)
        raw = f.raw
        assert isinstance(raw, readers._S3Raw)
        raw.body._raw_stream.close()  # the connection drops mid-object
        rest = f.read()
    assert first + rest == payload
    assert "resuming" in caplog.text, "the reader reconnected with a Range request"


def test_upload_dir_puts_the_marker_last_and_download_dir_fetches_once(
    tmp_path: Path, s3: S3Settings, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "tokenizer").mkdir(parents=True)
    for name in ("a.arrow", "manifest.json", "_SUCCESS", "tokenizer/tokenizer.json"):
        (tree / name).write_text(name * 10)
    order: list[str] = []
    real_upload = storage.upload_file

    def recording_upload(
        path: Path, uri: str, s3: S3Settings | None = None, metadata: Any = None
    ) -> None:
        order.append(uri.rsplit("/ds/", 1)[1])
        real_upload(path, uri, s3, metadata)

    monkeypatch.setattr(transfers, "upload_file", recording_upload)  # upload_dir's own
    storage.upload_dir(tree, f"s3://{bucket}/ds", s3, marker="_SUCCESS")
    assert order[-1] == "_SUCCESS" and len(order) == 4

    dest = tmp_path / "cache"
    got = storage.download_dir(f"s3://{bucket}/ds", dest, s3, patterns=["tokenizer/*", "*.json"])
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        storage.DOWNLOAD_STATE,
        "manifest.json",
        "tokenizer/tokenizer.json",
    ]
    assert got == dest
    stamp = (dest / "manifest.json").stat().st_mtime_ns
    storage.download_dir(f"s3://{bucket}/ds", dest, s3, patterns=["*.json"])
    assert (dest / "manifest.json").stat().st_mtime_ns == stamp, "unchanged objects not refetched"
    storage.write_text(f"s3://{bucket}/ds/manifest.json", "changed", s3)
    storage.download_dir(f"s3://{bucket}/ds", dest, s3, patterns=["*.json"])
    assert (dest / "manifest.json").read_text() == "changed"
    with pytest.raises(storage.NotFound):
        storage.download_dir(f"s3://{bucket}/nothing-here", dest, s3)


def test_metadata_head_streamed_hash_and_delete(
    tmp_path: Path, s3: S3Settings, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.MULTIPART_THRESHOLD_ENV, str(5 * 1024 * 1024))
    tree = tmp_path / "tree"
    tree.mkdir()
    big = os.urandom(6 * 1024 * 1024 + 3)  # multipart: the metadata must survive it
    (tree / "big.bin").write_bytes(big)
    (tree / "small.txt").write_text("small")
    digest = hashlib.sha256(big).hexdigest()
    storage.upload_dir(tree, f"s3://{bucket}/t", s3, metadata={"big.bin": {"sha256": digest}})
    info = storage.head(f"s3://{bucket}/t/big.bin", s3)
    assert info.etag.endswith("-2") and info.size == len(big)
    assert info.metadata == {"sha256": digest}
    assert storage.head(f"s3://{bucket}/t/small.txt", s3).metadata == {}
    assert storage.sha256_uri(f"s3://{bucket}/t/big.bin", s3) == digest
    assert storage.sha256_uri(str(tree / "big.bin")) == digest
    assert storage.head(str(tree / "small.txt")) == storage.ObjectInfo(5, "", {})
    with pytest.raises(storage.NotFound):
        storage.head(f"s3://{bucket}/t/nope", s3)

    storage.delete(f"s3://{bucket}/t/small.txt", s3)
    storage.delete(f"s3://{bucket}/t/small.txt", s3)  # already gone: fine
    assert not storage.exists(f"s3://{bucket}/t/small.txt", s3)
    storage.delete(str(tree / "small.txt"))
    storage.delete(str(tree / "small.txt"))
    assert not (tree / "small.txt").exists()
