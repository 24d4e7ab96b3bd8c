"""storage, hostile and broken: keys that escape, credentials in URIs, endpoints, S3 failures.

Real: boto3/botocore over HTTP to a real `moto_server` (the traversal keys), the stage entry point
`kubetrain_trainer.__main__.main` (exit codes and result JSON), botocore's retry and error
handling. Emulated: S3 *failures* — a small HTTP server here answers every request with an S3
error document (503 SlowDown, 403 InvalidAccessKeyId) or resets the connection, because moto
never throttles or checks credentials; the same server counts the requests a refused endpoint must
not get (boto3's client factory is wrapped to record that no client is built, and still builds
it). The resolver (`socket.getaddrinfo`) is played for one made-up name that resolves to a
metadata address, because no real DNS is here.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetrain_contract.exit_codes import EXIT_INVALID, EXIT_RETRY
from kubetrain_trainer import storage
from kubetrain_trainer.__main__ import main
from kubetrain_trainer.config import AWS_S3, S3Settings
from kubetrain_trainer.storage.credentials import refuse_credentials
from preprocess_support import config, docs, write_jsonl

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


@pytest.fixture
def s3(moto_endpoint: str) -> S3Settings:
    return S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)


@pytest.fixture
def bucket(s3: S3Settings) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    storage.client(s3).create_bucket(Bucket=name)
    return name


@pytest.mark.parametrize(
    "key", ["base/../../escaped/x.json", "base/a/../../../escaped/x.json", "base//x.json"]
)
def test_a_key_that_escapes_its_directory_is_refused(
    s3: S3Settings, bucket: str, tmp_path: Path, key: str
) -> None:
    c = storage.client(s3)
    c.put_object(Bucket=bucket, Key="base/ok.json", Body=b"{}")
    c.put_object(Bucket=bucket, Key=key, Body=b"planted")
    dest = tmp_path / "a" / "dest"
    with pytest.raises(storage.Refused) as caught:
        storage.download_dir(f"s3://{bucket}/base", dest, s3)
    assert caught.value.exit_code == EXIT_INVALID
    assert key.removeprefix("base/") in caught.value.message
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []  # nothing at all: the listing is checked before any fetch


def test_a_symlink_inside_the_destination_does_not_lead_out(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(tmp_path)
    with pytest.raises(storage.Refused, match="symlink"):
        storage.contained(dest, "link/x", "s3://b/p")
    assert storage.contained(dest, "sub/x", "s3://b/p") == dest / "sub" / "x"


CREDENTIAL_URIS = [
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/data.jsonl",
    f"s3://bucket/data.jsonl?X-Amz-Credential=AKIA%2F20260101&X-Amz-Signature={SECRET}",
    f"s3://bucket/data.jsonl?token={SECRET}",
    f"hf://{SECRET}@org/model",
]


@pytest.mark.slow  # starts a stage or operator process
@pytest.mark.parametrize("uri", CREDENTIAL_URIS)
def test_a_credential_uri_is_refused_without_echoing_it(
    tmp_path: Path, uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub = uri.startswith("hf://")
    ok = str(write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}]))
    cfg = config(tmp_path, [ok], None if hub else [uri])
    if hub:
        cfg["tokenizer"] = {"uri": uri, "train": None}
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    code = main(["preprocess", "--config", str(path), "--workdir", str(tmp_path / "work")])
    assert code == EXIT_INVALID
    result = (tmp_path / "work" / "result-preprocess.json").read_text()
    error = json.loads(result)["error"]
    field = "tokenizer.uri" if hub else "sources[1].uri"
    assert error.startswith(field), error
    secret_field = "storage.hf.secretName" if hub else "storage.s3.secretName"
    assert secret_field in error
    assert SECRET not in result and SECRET not in caplog.text
    assert not (tmp_path / "out").exists()  # refused before any I/O


@pytest.mark.parametrize(
    ("endpoint", "allow", "problem"),
    [
        ("http://minio.storage:9000", False, "allowInsecureEndpoint"),
        ("http://169.254.169.254", True, "metadata"),
        ("https://[fe80::1]:9000", True, "link-local"),
        ("https://metadata.google.internal", False, "metadata"),
        ("ftp://store", False, "https://"),
        (f"https://user:{SECRET}@store.example", False, "secretName"),
    ],
)
def test_unsafe_endpoints_are_refused(endpoint: str, allow: bool, problem: str) -> None:
    s3 = S3Settings(endpoint=endpoint, region="", allow_insecure_endpoint=allow)
    with pytest.raises(storage.Refused) as caught:
        storage.client(s3)
    assert problem in caught.value.message and SECRET not in caught.value.message
    assert caught.value.exit_code == EXIT_INVALID


def test_safe_endpoints_are_accepted() -> None:
    for s3 in (
        S3Settings(endpoint="https://s3.example.com", region="", allow_insecure_endpoint=False),
        S3Settings(endpoint="http://minio.storage:9000", region="", allow_insecure_endpoint=True),
        S3Settings(endpoint="http://127.0.0.1:9000", region="", allow_insecure_endpoint=True),
        S3Settings(endpoint="http://localhost:9000", region="", allow_insecure_endpoint=True),
        S3Settings(endpoint="https://[::1]:9000", region="", allow_insecure_endpoint=False),
        AWS_S3,
    ):
        assert storage.endpoint_problem(s3) is None


#: Issue 16.3: the instance-metadata address (and loopback, as a number) in the spellings that
#: resolvers accept; the API's side of each is a case of tests/operator/test_api.py.
DISGUISED_ENDPOINTS = [
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",
    "http://169.254.43518/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[::a9fe:a9fe]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[fd00:ec2::254]/",
    "http://[fd00:ec2:0:0:0:0:0:254]/",
    "http://2130706433:18765",
]


@pytest.mark.parametrize("endpoint", DISGUISED_ENDPOINTS)
def test_metadata_addresses_in_other_spellings_are_refused(endpoint: str) -> None:
    s3 = S3Settings(endpoint=endpoint, region="", allow_insecure_endpoint=True)
    problem = storage.endpoint_problem(s3)
    assert problem is not None and ("metadata" in problem or "as a number" in problem)


@pytest.mark.parametrize("resolved", ["169.254.169.254", "::ffff:169.254.169.254", "fe80::1"])
def test_a_name_that_resolves_to_a_metadata_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, resolved: str
) -> None:
    """A DNS name is resolved before use (the resolver is the one thing played here)."""
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "imds.attacker.test":
            return real(host, *args, **kwargs)
        family = socket.AF_INET6 if ":" in resolved else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (resolved, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    s3 = S3Settings(endpoint="https://imds.attacker.test", region="", allow_insecure_endpoint=False)
    problem = storage.endpoint_problem(s3)
    assert problem is not None and "resolves to a link-local or instance-metadata" in problem


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001"])
def test_a_refused_endpoint_gets_no_request_and_no_client(
    failing_s3: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """127.0.0.1 spelled as a number reaches the server here unless the trainer refuses it first;
    it must refuse before boto3 builds a client (which would sign a request)."""
    import boto3.session

    created: list[object] = []
    real_client = boto3.session.Session.client

    def recording(self: boto3.session.Session, *args: Any, **kwargs: Any) -> Any:
        created.append(args)
        return real_client(self, *args, **kwargs)

    monkeypatch.setattr(boto3.session.Session, "client", recording)
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage.client.cache_clear()
    endpoint = f"http://{host}:{failing_s3.server_address[1]}"
    s3 = S3Settings(endpoint=endpoint, region="us-east-1", allow_insecure_endpoint=True)
    with pytest.raises(storage.Refused) as caught:
        storage.size("s3://bucket/latest/meta-data/iam/security-credentials/role", s3)
    assert caught.value.exit_code == EXIT_INVALID and "s3.endpoint" in caught.value.message
    assert created == [] and failing_s3.requests == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://bucket/data.jsonl#X-Amz-Signature={SECRET}",
        f"s3://bucket/data.jsonl;token={SECRET}",
        f"s3://bucket/dir;X-Amz-Credential={SECRET}/data.jsonl",
        f"s3://bucket/data.jsonl?X-Amz-%2553ignature={SECRET}",
    ],
)
def test_credentials_in_fragments_path_parameters_and_encoded_names_are_refused(uri: str) -> None:
    """Issue 16.6: validate refuses these (test_api's cases); so does the trainer, silently."""
    with pytest.raises(storage.Refused) as caught:
        refuse_credentials(uri, "validation[0]")
    assert caught.value.exit_code == EXIT_INVALID
    assert caught.value.message.startswith("validation[0]: s3://bucket/")
    assert SECRET not in caught.value.message


class _Failing(BaseHTTPRequestHandler):
    """Answers every S3 request with the server's configured failure."""

    def _fail(self) -> None:
        mode = self.server.mode  # type: ignore[attr-defined]
        self.server.requests += 1  # type: ignore[attr-defined]
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            self.connection.close()
            return
        status, code = {"throttle": (503, "SlowDown"), "denied": (403, "InvalidAccessKeyId")}[mode]
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{code}</Message><RequestId>1</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _fail

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def failing_s3() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.mode, server.requests = "throttle", 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.mark.slow  # starts a stage or operator process
@pytest.mark.parametrize(
    ("mode", "code", "says"),
    [
        ("throttle", EXIT_RETRY, "S3 is throttling or failing"),
        ("reset", EXIT_RETRY, "cannot reach the object store"),
        ("denied", EXIT_INVALID, "storage.s3.secretName"),
    ],
)
def test_s3_trouble_is_classified_for_the_operator(
    failing_s3: ThreadingHTTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    code: int,
    says: str,
) -> None:
    failing_s3.mode = mode  # type: ignore[attr-defined]
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage.client.cache_clear()
    endpoint = f"http://127.0.0.1:{failing_s3.server_address[1]}"
    cfg = config(tmp_path, ["s3://bucket/data.jsonl"])
    cfg["s3"] = {"endpoint": endpoint, "region": "us-east-1", "allowInsecureEndpoint": True}
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    assert main(["preprocess", "--config", str(path), "--workdir", str(tmp_path / "w")]) == code
    result = json.loads((tmp_path / "w" / "result-preprocess.json").read_text())
    assert says in result["error"] and "s3://bucket/data.jsonl" in result["error"]
    assert result["exitCode"] == code and SECRET not in json.dumps(result)
    assert failing_s3.requests >= (2 if code == EXIT_RETRY else 1)  # botocore retried


def test_missing_credentials_name_the_secret_field(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.client.cache_clear()
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    with pytest.raises(storage.AccessDenied) as caught:
        storage.size("s3://bucket/x.jsonl", s3)
    storage.client.cache_clear()
    assert "no S3 credentials" in caught.value.message
    assert "storage.s3.secretName" in caught.value.message
    assert caught.value.exit_code == EXIT_INVALID


def test_prefixes_and_globs_expand_to_sorted_files(
    s3: S3Settings, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = storage.client(s3)
    for key in ("dir/b.jsonl", "dir/a.jsonl", "dir/sub/c.jsonl", "dir/notes.txt", "other/d.jsonl"):
        c.put_object(Bucket=bucket, Key=key, Body=b"{}\n")
    base = f"s3://{bucket}"
    assert storage.expand(f"{base}/dir/", "train[0]", s3) == [
        f"{base}/dir/a.jsonl",
        f"{base}/dir/b.jsonl",
        f"{base}/dir/notes.txt",
        f"{base}/dir/sub/c.jsonl",
    ]
    assert storage.expand(f"{base}/dir/*.jsonl", "train[0]", s3) == [
        f"{base}/dir/a.jsonl",
        f"{base}/dir/b.jsonl",
    ]
    assert storage.expand(f"{base}/*/*.jsonl", "train[0]", s3) == [
        f"{base}/dir/a.jsonl",
        f"{base}/dir/b.jsonl",
        f"{base}/other/d.jsonl",
    ]
    with pytest.raises(storage.NotFound, match=r"train\[1\]: .* matches no file"):
        storage.expand(f"{base}/dir/*.parquet", "train[1]", s3)
    for name in ("z.jsonl", "a.jsonl", "m.txt"):
        (tmp_path / name).write_text("{}\n")
    assert storage.expand(f"{tmp_path}/*.jsonl", "train[0]") == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "z.jsonl"),
    ]
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path.parent))
    assert storage.expand(f"pvc://{tmp_path.name}/[am]*", "train[0]") == [
        f"pvc://{tmp_path.name}/a.jsonl",
        f"pvc://{tmp_path.name}/m.txt",
    ]


def test_each_file_of_a_glob_is_fingerprinted_into_the_key(tmp_path: Path) -> None:
    from preprocess_support import parse, run_stage

    data = tmp_path / "data"
    data.mkdir()
    texts = docs()
    for i in range(3):
        write_jsonl(data / f"part-{i}.jsonl", [{"text": t} for t in texts[i * 40 : i * 40 + 40]])
    cfg = config(tmp_path, [f"{data}/part-*.jsonl"])
    first = run_stage(cfg, tmp_path / "work")
    manifest = json.loads((Path(first["uri"]) / "manifest.json").read_text())
    expected = [str(data / f"part-{i}.jsonl") for i in range(3)]
    assert [i["uri"] for i in manifest["inputs"]] == expected
    assert all(i["fingerprint"].startswith("sha256:") for i in manifest["inputs"])
    write_jsonl(data / "part-1.jsonl", [{"text": t} for t in texts[200:240]])
    from kubetrain_trainer.preprocess import pipeline

    assert pipeline.locate(parse(cfg), tmp_path / "work").key != first["key"]


@pytest.mark.parametrize(
    ("key", "shard"),
    [("a" * 64, "../../escaped/train-00000.arrow"), ("../../escaped", "train-00000.arrow")],
)
def test_a_manifest_that_names_paths_outside_the_dataset_is_refused(
    tmp_path: Path, key: str, shard: str
) -> None:
    from kubetrain_trainer.preprocess import dataset

    root = tmp_path / "datasets" / "x"
    root.mkdir(parents=True)
    manifest = {
        "formatVersion": dataset.FORMAT_VERSION,
        "key": key,
        "format": "text",
        "splits": {"train": {"shards": [{"file": shard, "bytes": 1, "sha256": "0"}], "rows": 1}},
    }
    (root / dataset.MANIFEST).write_text(json.dumps(manifest))
    (root / dataset.SUCCESS).write_text(key)
    with pytest.raises(dataset.DatasetError, match="could lead outside the dataset") as caught:
        dataset.load_manifest(str(root))
    assert caught.value.exit_code == EXIT_INVALID
