"""Every URI a stage reads or writes: local paths, `file://`, `pvc://CLAIM/path`, `s3://`, `hf://`.

One package so that the preprocess stage, the trainer and the merge stage agree on what a URI
means; they import the names below from `kubetrain_trainer.storage`. Its modules, lowest first:

* `errors` — storage failures with the contract's exit codes (2: missing, refused, denied;
  1: transient);
* `uris` — the grammar: schemes, `pvc://` → `$KUBETRAIN_PVC_ROOT`, join, split, containment;
* `credentials` — the policy: no credentials in URIs or endpoints, no metadata endpoints;
* `s3` — the boto3 client, its transfer settings, botocore errors → `errors`, listing;
* `readers` — HEAD, content identities, regular-file checks, resumable and pinned reads;
* `globbing` — prefixes and globs expanded to sorted input lists;
* `atomic` — local writes readers see whole or not at all;
* `hub` — `hf://` repositories through `huggingface_hub`;
* `transfers` — writes, uploads and downloads of files and trees (markers last), deletes.
"""

from __future__ import annotations

from kubetrain_trainer.storage.atomic import fsync
from kubetrain_trainer.storage.credentials import check_config, endpoint_problem
from kubetrain_trainer.storage.errors import AccessDenied, NotFound, Refused, StorageError
from kubetrain_trainer.storage.globbing import expand
from kubetrain_trainer.storage.readers import (
    Changed,
    Identity,
    ObjectInfo,
    Pin,
    check_local_input,
    exists,
    head,
    identify,
    open_binary,
    read_text,
    sha256_file,
    sha256_uri,
    size,
)
from kubetrain_trainer.storage.s3 import (
    MAX_ATTEMPTS_ENV,
    MULTIPART_THRESHOLD_ENV,
    client,
    list_objects,
)
from kubetrain_trainer.storage.transfers import (
    DOWNLOAD_STATE,
    delete,
    download_dir,
    download_file,
    upload_dir,
    upload_file,
    write_text,
)
from kubetrain_trainer.storage.uris import (
    PVC_ROOT_ENV,
    contained,
    is_hf,
    is_s3,
    join,
    local_path,
    split_s3,
)

__all__ = [
    "DOWNLOAD_STATE",
    "MAX_ATTEMPTS_ENV",
    "MULTIPART_THRESHOLD_ENV",
    "PVC_ROOT_ENV",
    "AccessDenied",
    "Changed",
    "Identity",
    "NotFound",
    "ObjectInfo",
    "Pin",
    "Refused",
    "StorageError",
    "check_config",
    "check_local_input",
    "client",
    "contained",
    "delete",
    "download_dir",
    "download_file",
    "endpoint_problem",
    "exists",
    "expand",
    "fsync",
    "head",
    "identify",
    "is_hf",
    "is_s3",
    "join",
    "list_objects",
    "local_path",
    "open_binary",
    "read_text",
    "sha256_file",
    "sha256_uri",
    "size",
    "split_s3",
    "upload_dir",
    "upload_file",
    "write_text",
]
