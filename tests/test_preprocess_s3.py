"""S3 end to end: inputs, the tokenizer directory, the dataset and its pointer all on S3.

Real: boto3 and its transfer manager over HTTP against a real `moto_server` (multipart upload of a
shard above the lowered threshold, ranged and paginated reads), gzip/zstd/Parquet inputs, the same
stage code as in the pod. Emulated: S3 itself (moto). The multipart threshold is lowered to S3's
minimum part size (5 MiB) so a ~10 MiB shard goes up in parts.
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.preprocess import dataset
from preprocess_support import config, docs, run_stage, tokenizer_dir


@pytest.mark.slow
def test_s3_inputs_and_outputs_with_multipart_shards(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.MULTIPART_THRESHOLD_ENV, str(5 << 20))
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1")
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
