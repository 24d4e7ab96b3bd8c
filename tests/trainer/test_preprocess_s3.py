"""S3 end to end: inputs, the tokenizer directory, the dataset and its pointer all on S3.

Real: boto3 and its transfer manager over HTTP against a real `moto_server` (multipart upload of a
shard above the lowered threshold, ranged and paginated reads, object metadata), gzip/zstd/Parquet
inputs, the same stage code as in the pod. Emulated: S3 itself (moto). The multipart threshold is
lowered to S3's minimum part size (5 MiB) so a ~10 MiB shard goes up in parts. A damaged dataset
is made by overwriting a shard object with a plain PUT, as another tool would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.preprocess import dataset
from preprocess_support import config, docs, run_stage, tokenizer_dir, write_jsonl


@pytest.mark.slow
def test_s3_inputs_and_outputs_with_multipart_shards(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.MULTIPART_THRESHOLD_ENV, str(5 << 20))
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"kt-{uuid.uuid4().hex[:10]}"
    storage.client(s3).create_bucket(Bucket=bucket)
    texts = [t for t in docs(3_000_000) if all(line.strip() for line in t.split("\n"))]
    third = len(texts) // 3
    local = tmp_path / "local"
    local.mkdir()
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts[:third]).encode()
    (local / "a.jsonl.gz").write_bytes(gzip.compress(body))
    txt = "\n\n".join(texts[third : 2 * third]).encode()
    (local / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(txt))
    pq.write_table(
        pa.Table.from_pylist([{"text": t} for t in texts[2 * third :]]), local / "c.parquet"
    )
    names = ["a.jsonl.gz", "b.txt.zst", "c.parquet"]
    for name in names:
        storage.upload_file(local / name, f"s3://{bucket}/data/{name}", s3)
    storage.upload_dir(tokenizer_dir(), f"s3://{bucket}/models/tok", s3)

    cfg = config(
        tmp_path,
        [f"s3://{bucket}/data/{name}" for name in names],
        tokenizer={"uri": f"s3://{bucket}/models/tok"},
        cacheRoot=f"s3://{bucket}/cache",
        datasetPointer=f"s3://{bucket}/runs/r1/dataset.json",
        s3=s3.model_dump(by_alias=True),
        blockSize=1024,
    )
    result = run_stage(cfg, tmp_path / "w")
    assert result["rowsRead"] == result["accepted"] == len(texts)
    pointer = json.loads(storage.read_text(f"s3://{bucket}/runs/r1/dataset.json", s3))
    assert pointer == {"key": result["key"], "uri": result["uri"], "cacheHit": False}
    assert result["uri"] == f"s3://{bucket}/cache/datasets/{result['key']}"
    objects = {rel: etag for rel, _, etag in storage.list_objects(result["uri"], s3)}
    assert {"_SUCCESS", "manifest.json", "tokenizer/tokenizer.json", "train-00000.arrow"} <= set(
        objects
    )
    assert "-" in objects["train-00000.arrow"], "the shard went up as a multipart upload"

    path, manifest = dataset.verify_dataset(result["uri"], s3, cache_dir=tmp_path / "dl")
    assert manifest["counts"]["tokens"] == result["tokens"]
    assert manifest["splits"]["train"]["shards"][0]["bytes"] > 5 << 20
    assert dataset.open_split(path, manifest).num_rows == result["trainRows"]

    same_locally = run_stage(
        config(tmp_path / "l", [str(local / name) for name in names], blockSize=1024),
        tmp_path / "w",
    )
    _, local_manifest = dataset.verify_dataset(same_locally["uri"])
    assert local_manifest["splits"] == manifest["splits"], "S3 and local inputs: same shards"

    assert run_stage(cfg, tmp_path / "w")["cacheHit"] is True
    storage.write_text(storage.join(result["uri"], "train-00000.arrow"), "garbage", s3)
    with pytest.raises(dataset.DatasetError, match="does not match"):
        dataset.verify_dataset(result["uri"], s3, cache_dir=tmp_path / "dl2")
    storage.client(s3).delete_object(Bucket=bucket, Key=f"cache/datasets/{result['key']}/_SUCCESS")
    assert not dataset.is_complete(result["uri"], s3)
    rebuilt = run_stage(cfg, tmp_path / "w")
    assert rebuilt["cacheHit"] is False and dataset.is_complete(result["uri"], s3)
    dataset.verify_dataset(result["uri"], s3, cache_dir=tmp_path / "dl3")


def test_a_damaged_s3_dataset_is_caught_on_a_hit_rebuilt_and_republished(
    tmp_path: Path,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"kt-{uuid.uuid4().hex[:10]}"
    client = storage.client(s3)
    client.create_bucket(Bucket=bucket)
    source = write_jsonl(tmp_path / "a.jsonl", ({"text": t} for t in docs(150_000)))
    cfg = config(
        tmp_path,
        [str(source)],
        cacheRoot=f"s3://{bucket}/cache",
        datasetPointer=f"s3://{bucket}/runs/r1/dataset.json",
        s3=s3.model_dump(by_alias=True),
    )
    first = run_stage(cfg, tmp_path / "w")
    uri, prefix = first["uri"], f"cache/datasets/{first['key']}"

    def published() -> dict[str, str]:
        return {
            rel: hashlib.sha256(
                client.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()
            ).hexdigest()
            for rel, _, _ in storage.list_objects(uri, s3)
        }

    def pointer() -> dict[str, object]:
        return json.loads(storage.read_text(f"s3://{bucket}/runs/r1/dataset.json", s3))

    original = published()
    manifest = dataset.load_manifest(uri, s3)
    shard = manifest["splits"]["train"]["shards"][0]
    shard_key, shard_uri = f"{prefix}/{shard['file']}", f"{uri}/{shard['file']}"
    assert storage.head(shard_uri, s3).metadata == {"sha256": shard["sha256"]}
    assert original[shard["file"]] == shard["sha256"]
    streamed: list[str] = []
    real_sha256_uri = storage.sha256_uri

    def recording_sha256_uri(uri: str, s3: S3Settings | None = None) -> str:
        streamed.append(uri)
        return real_sha256_uri(uri, s3)

    monkeypatch.setattr(storage, "sha256_uri", recording_sha256_uri)
    assert run_stage(cfg, tmp_path / "w")["cacheHit"] is True
    assert streamed == [], "an intact hit costs one HEAD per shard, no read"

    # Same size, other bytes, no metadata: what a copy by another tool leaves behind.
    good = client.get_object(Bucket=bucket, Key=shard_key)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=shard_key, Body=bytes(bad))
    with pytest.raises(dataset.DatasetError) as refused:
        dataset.verify_dataset(uri, s3, cache_dir=tmp_path / "dl")
    message = refused.value.message
    assert message.startswith(f"{uri}: the dataset on S3 is damaged")
    assert f"{shard_uri}: sha256 does not match the manifest" in message
    assert "Rerun the preprocess stage" in message and dataset.RERUN in message
    assert "rebuilds and republishes" in message and "delete" not in message
    assert not (tmp_path / "dl" / first["key"] / shard["file"]).exists(), "bad copy not kept"

    with caplog.at_level(logging.WARNING, logger="kubetrain_trainer.preprocess"):
        rebuilt = run_stage(cfg, tmp_path / "w")
    assert rebuilt["cacheHit"] is False and pointer()["cacheHit"] is False
    assert streamed == [shard_uri], "no metadata on the bad object: it was hashed by streaming"
    assert f"{uri} is damaged ({shard['file']}: sha256 does not match" in caplog.text
    assert published() == original, "rebuilt and republished: the same bytes as the first build"
    assert storage.head(shard_uri, s3).metadata == {"sha256": shard["sha256"]}
    path, _ = dataset.verify_dataset(uri, s3, cache_dir=tmp_path / "dl")
    assert dataset.damaged_shards(path, manifest) == {}

    # A truncated object: its size gives it away, no read needed.
    streamed.clear()
    client.put_object(Bucket=bucket, Key=shard_key, Body=good[:1000])
    assert dataset.damaged_objects(uri, manifest, s3) == {
        shard["file"]: f"size 1000 does not match the manifest's {shard['bytes']} bytes"
    }
    assert run_stage(cfg, tmp_path / "w")["cacheHit"] is False
    assert streamed == [] and published() == original
    # A lost object.
    client.delete_object(Bucket=bucket, Key=shard_key)
    assert run_stage(cfg, tmp_path / "w")["cacheHit"] is False and published() == original
    assert run_stage(cfg, tmp_path / "w")["cacheHit"] is True and pointer()["cacheHit"] is True

    # A damaged local copy of an intact dataset is fetched again, not blamed on S3.
    local_copy = path / shard["file"]
    local_copy.write_bytes(b"x" * shard["bytes"])
    with caplog.at_level(logging.WARNING):
        again, _ = dataset.verify_dataset(uri, s3, cache_dir=tmp_path / "dl")
    assert again == path and storage.sha256_file(local_copy) == shard["sha256"]
    assert "local copy damaged" in caplog.text
