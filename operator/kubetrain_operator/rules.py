"""Every rule of the TrainingRun API, once: where it applies, its check, CEL, message and fix.

Both enforcement points are generated from this table, so they cannot drift apart:

- `api.py` runs each rule's Python `check` on the parsed run (every rule, every problem, in one
  pass; see `api.parse_run`), and each field rule on every string of its kind;
- `crd.py` attaches each rule's `cel` as an `x-kubernetes-validations` entry at `at`, so the API
  server refuses the same things at `kubectl apply` (`cel` is None where CEL cannot say it).

`check` and `cel` say the same thing about the same node: `check` gets the parsed node at `at`
(pydantic objects, snake_case), `cel` reads the stored object there (camelCase, after the API
server's defaulting). A rule only runs where its node exists, as the API server does. Each CEL
expression reads only fields the API server exposes to CEL (typed schema nodes) and guards every
field that can be absent with `has()`; tests/operator/test_crd.py checks both on the generated CRD.

What only the trainer can see (the launcher's world size, CUDA, the checkpoint it resumes) it
re-checks at start-up; `trainer` names that check where there is one. docs/api.md lists the table.
This module imports nothing of the operator: the models import it, not the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubetrain_contract.credentials import (
    METADATA_ADDRESSES,
    METADATA_HOSTS,
    SECRET_QUERY_WORDS,
)
from kubetrain_contract.methods import METHOD_FORMATS

#: Child names append suffixes such as `-preprocess-1a2b3c4d`; 50 leaves room under 63.
MAX_NAME_LENGTH = 50
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
EIGHT_BIT = ("_8bit", "paged_")
#: Where credentials go instead of URIs; every refusal names it.
S3_SECRET_FIELD = "storage.s3.secretName"  # noqa: S105 (a field name)


# ------------------------------------------------------------------------------ field rules


@dataclass(frozen=True)
class FieldRule:
    """A rule on one string field: refused when it matches `forbid`, unless it matches `unless`.

    The patterns are plain RE2/Python regular expressions (no look-around, no back-references), so
    CEL's `matches()` on the API server and `re.search` here give the same answer.
    """

    name: str
    forbid: str
    unless: str | None
    message: str
    fix: str

    def check(self, value: str) -> bool:
        if re.search(self.forbid, value) is None:
            return True
        return self.unless is not None and re.search(self.unless, value) is not None

    @property
    def cel(self) -> str:
        rule = f"!self.matches({_cel_string(self.forbid)})"
        if self.unless is not None:
            rule += f" || self.matches({_cel_string(self.unless)})"
        return rule


def _cel_string(pattern: str) -> str:
    """A CEL single-quoted string literal holding the pattern (backslashes escaped)."""
    return "'" + pattern.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"
_PVC_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_HF_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
#: The start of a URI parameter's name, up to where a credential word may appear: after `?`, `&`,
#: `;` or `#` (query, path parameters, fragment), as the trainer splits them.
_PARAMETER = r"[?&;#][^?&;#=]*"


#: Data URIs that name a Hugging Face Hub dataset start with this.
HUB_DATASET_PREFIX = "hf://datasets/"


def _uri_rules(schemes: tuple[str, ...], hub_datasets: bool = False) -> tuple[FieldRule, ...]:
    """The rules of a URI kind; `hub_datasets`: hf:// names a dataset (hf://datasets/ORG/NAME)."""
    listed = ", ".join(f"{s}://" for s in schemes)
    rules = [
        FieldRule(
            "uri-scheme",
            _SCHEME,
            f"^({'|'.join(schemes)})://",
            "the URI scheme is not supported here",
            f"use {listed} or a local path",
        ),
        FieldRule(
            "uri-name",
            r"^(s3|pvc|hf)://(/|$)",
            None,
            "needs a bucket, claim or repository after the scheme",
            "write SCHEME://NAME/path",
        ),
        FieldRule(
            "uri-pvc-claim",
            r"^pvc://",
            rf"^pvc://{_PVC_CLAIM}(/|$)",
            "pvc://CLAIM/path needs a PersistentVolumeClaim name (DNS-1123)",
            "use the claim's name, e.g. pvc://datasets/path",
        ),
        FieldRule(
            "uri-userinfo",
            r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*@",
            None,
            "carries credentials (user:password@ before the host or bucket)",
            f"remove them and use {S3_SECRET_FIELD} (a Secret) for S3 credentials",
        ),
        FieldRule(
            "uri-signed-query",
            rf"(?i){_PARAMETER}({'|'.join(SECRET_QUERY_WORDS)})[^?&;#=]*=",
            None,
            "carries a credential in a parameter (its query, a ;parameter or its #fragment: a "
            "presigned URL or a token)",
            f"use the plain s3://BUCKET/KEY with {S3_SECRET_FIELD} (a Secret) for credentials",
        ),
        FieldRule(
            "uri-encoded-parameter",
            rf"{_PARAMETER}%[^?&;#=]*=",
            None,
            "percent-encodes a parameter's name, which hides what it carries (a server decodes "
            "X%2DAmz%2DSignature to X-Amz-Signature)",
            "write parameter names plainly; credentials go in a Secret",
        ),
        FieldRule(
            "uri-dot-dot",
            r"(^|/)\.\.(/|$)",
            None,
            "has a '..' segment, which escapes its directory",
            "write the path without '..'",
        ),
    ]
    if "hf" in schemes and not hub_datasets:
        rules.append(
            FieldRule(
                "uri-hf-repo",
                r"^hf://",
                rf"^hf://{_HF_NAME}/{_HF_NAME}(@[A-Za-z0-9._/-]+)?$",
                "hf:// names a Hub repository: hf://ORG/NAME, optionally @REVISION",
                "write e.g. hf://meta-llama/Llama-3.1-8B@main",
            )
        )
    if "hf" in schemes and hub_datasets:
        rules.append(
            FieldRule(
                "uri-hf-dataset",
                r"^hf://",
                rf"^{HUB_DATASET_PREFIX}{_HF_NAME}/{_HF_NAME}(@[A-Za-z0-9._/-]+)?$",
                "hf:// data names a Hub dataset: hf://datasets/ORG/NAME, optionally @REVISION",
                "write e.g. hf://datasets/allenai/tulu-3-sft-mixture@main",
            )
        )
    return tuple(rules)


#: A dotted-quad IPv4 address as the API server and every resolver read it the same: four decimal
#: parts without leading zeros.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = rf"({_OCTET}\.){{3}}{_OCTET}"
_HOST_END = r"(:[0-9]+)?(/|$)"


def _ipv6_spellings(address: str) -> str:
    """A regex for an IPv6 address with `::` in every zero-run spelling (fd00:ec2::254,
    fd00:ec2:0::254, fd00:ec2:0:0:0:0:0:254 …); leading zeros are refused by their own rule."""
    head, tail = address.split("::")
    return rf"\[{head}(:0)*::?(0:)*{tail}\]"


def _metadata_hosts() -> str:
    """Link-local ranges and the contract's metadata addresses and names, as one alternation."""
    names = [h.replace(".", r"\.") + r"\.?" for h in METADATA_HOSTS]
    ipv4 = [a.replace(".", r"\.") for a in METADATA_ADDRESSES if ":" not in a]
    ipv6 = [_ipv6_spellings(a) for a in METADATA_ADDRESSES if ":" in a]
    link_local = [r"169\.254\.[0-9.]+", r"\[fe[89ab][0-9a-f]:[0-9a-f:]*\]"]
    return "|".join([*link_local, *ipv4, *ipv6, *names])


def _endpoint_rules() -> tuple[FieldRule, ...]:
    """A host is a DNS name, a dotted quad or a bracketed IPv6 address in canonical form, and
    never a link-local or metadata address: every other spelling of an address (2852039166,
    0xa9fea9fe, 0251.0376.0251.0376, 169.254.43518, [::ffff:169.254.169.254]) is what resolvers
    accept and these rules would not see through."""
    ipv4_in_ipv6 = (
        r"[0:]*:(ffff:(0:)?)?[0-9a-f]{1,4}:[0-9a-f]{1,4}\]"  # IPv4-mapped, -translated, -compatible
        r"|64:ff9b:"  # NAT64
        r"|2002:"  # 6to4
    )
    return (
        FieldRule(
            "endpoint-host-number",
            rf"(?i)^https?://([^/:\[\]]*\.)?(0x[0-9a-f]*|[0-9]+)\.?{_HOST_END}",
            rf"^https?://{_CANONICAL_IPV4}{_HOST_END}",
            "spells its host as a number (decimal, hex, octal or fewer than four parts): an IP "
            "address in disguise",
            "write a DNS name, a dotted-quad IPv4 address without leading zeros (10.0.0.5) or a "
            "bracketed IPv6 address ([2001:db8::5])",
        ),
        FieldRule(
            "endpoint-ipv6-form",
            r"^https?://\[([^\]]*[A-F.]|([^\]]*:)?0[0-9a-f])",
            None,
            "writes an IPv6 address with upper-case letters, leading zeros or a dotted IPv4 part",
            "write it in lower case without leading zeros (RFC 5952), e.g. [2001:db8::5]; an IPv4 "
            "address as a dotted quad",
        ),
        FieldRule(
            "endpoint-ipv6-embeds-ipv4",
            rf"^https?://\[({ipv4_in_ipv6})",
            None,
            "is an IPv6 form of an IPv4 address (IPv4-mapped or -compatible, NAT64, 6to4), which "
            "hides the IPv4 address",
            "write the IPv4 address as a dotted quad",
        ),
        FieldRule(
            "endpoint-metadata",
            rf"(?i)^https?://({_metadata_hosts()}){_HOST_END}",
            None,
            "is a link-local or cloud instance-metadata address (it hands out the node's "
            "credentials)",
            "use the storage service's own endpoint",
        ),
    )


#: Schemes per kind of URI: models, tokenizers (hf://ORG/NAME) and data (hf://datasets/ORG/NAME)
#: may come from the Hub; outputs and caches may not.
MODEL_URI_SCHEMES = ("s3", "pvc", "hf", "file")
DATA_URI_SCHEMES = ("s3", "pvc", "hf", "file")
OUTPUT_URI_SCHEMES = ("s3", "pvc", "file")
FIELD_RULES: dict[str, tuple[FieldRule, ...]] = {
    "model-uri": _uri_rules(MODEL_URI_SCHEMES),
    "data-uri": _uri_rules(DATA_URI_SCHEMES, hub_datasets=True),
    "uri": _uri_rules(OUTPUT_URI_SCHEMES),
    "endpoint": _endpoint_rules(),
}


def field_problems(kind: str, value: str) -> list[str]:
    """`problem — fix` for every field rule of `kind` the value breaks (never echoes the value)."""
    return [f"{r.message} — {r.fix}" for r in FIELD_RULES[kind] if not r.check(value)]


# ------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    """A rule on the node at `at` (a dotted path from the resource root; "" is the root).

    `field` is what it reports, relative to `at`. `check(node)` is True when the node is fine;
    `cel` is the same rule for the API server, evaluated on the same node (None: not expressible,
    the operator and `kubetrain validate` enforce it). `reads` lists the spec sections the rule
    needs (it is skipped while one of them has a field error; derived from `at` and `cel` when
    empty). `trainer` names what the trainer re-checks at start-up, when it does.
    """

    name: str
    at: str
    field: str
    check: Callable[[Any], bool]
    cel: str | None
    message: str
    fix: str
    reads: tuple[str, ...] = ()
    trainer: str | None = None

    @property
    def path(self) -> str:
        return ".".join(p for p in (self.at, self.field) if p)

    @property
    def text(self) -> str:
        return f"{self.path}: {self.message} — {self.fix}"

    def sections(self) -> frozenset[str]:
        """The spec sections (and `metadata`) this rule reads."""
        parts = self.at.split(".")
        if self.reads:
            return frozenset(self.reads)
        if len(parts) >= 2:
            return frozenset({parts[1]})
        found = _sections_read(self.cel or "", r"self\.spec\." if self.at == "" else r"self\.")
        if self.at == "" and "self.metadata" in (self.cel or ""):
            found |= {"metadata"}
        return found


@dataclass(frozen=True)
class RungRule:
    """A rule every sanity rung must pass, checked with the run around it.

    `check(spec, rung)` gets the run's spec and one rung; `cel` is a CEL expression on `self` (the
    spec) and `r` (the rung). The CRD gets it twice: for the single-gate form (`r` is
    `self.sanity`) and for `rungs` (inside `self.sanity.rungs.all(r, …)`).
    """

    name: str
    field: str
    check: Callable[[Any, Any], bool]
    cel: str
    message: str
    fix: str
    trainer: str | None = None

    def sections(self) -> frozenset[str]:
        """The spec sections this rule reads: `sanity` (the rung) and those its CEL names on `self`
        (the spec), which `check` reads too (tests/operator/test_api.py holds it to that)."""
        return frozenset({"sanity"}) | _sections_read(self.cel, r"self\.")

    def cel_rules(self) -> list[tuple[str, str]]:
        """(CEL on spec, fieldPath) for the single-gate form and for the list of rungs."""
        single = re.sub(r"\br\.", "self.sanity.", self.cel)
        return [
            (f"!has(self.sanity) || has(self.sanity.rungs) || ({single})", f".sanity.{self.field}"),
            (
                f"!has(self.sanity) || !has(self.sanity.rungs) || "
                f"self.sanity.rungs.all(r, {self.cel})",
                ".sanity.rungs",
            ),
        ]


def _method_formats_cel() -> str:
    """kubetrain_contract.methods as a CEL conditional (the last method is the else branch)."""

    def fits(formats: tuple[str, ...]) -> str:
        if len(formats) == 1:
            return f"self.data.format == '{formats[0]}'"
        return f"self.data.format in [{', '.join(repr(f) for f in formats)}]"

    *first, (_, last) = METHOD_FORMATS.items()
    branches = "".join(f"self.method.stage == '{m}' ? {fits(f)} : " for m, f in first)
    return branches + fits(last)


def _method_formats_text() -> str:
    """`pretrain takes text, sft text or chat, dpo preference`: the fix of stage-fits-format."""
    parts = [f"{method} {' or '.join(formats)}" for method, formats in METHOD_FORMATS.items()]
    return parts[0].replace(" ", " takes ", 1) + "".join(f", {p}" for p in parts[1:])


def _sections_read(cel: str, prefix: str) -> frozenset[str]:
    """The spec sections a CEL expression reads: the names right after `prefix` (a regex)."""
    return frozenset(re.findall(prefix + r"(\w+)", cel))


def _eight_bit(optimizer: str) -> bool:
    return optimizer.endswith(EIGHT_BIT[0]) or optimizer.startswith(EIGHT_BIT[1])


_EIGHT_BIT_CEL = "(OPT.endsWith('_8bit') || OPT.startsWith('paged_'))"
IMMUTABLE_SECTIONS = ("model", "tokenizer", "data", "method", "training", "distributed")
_SANITY_GATE_FIELDS = (
    "gpus",
    "steps",
    "minLossDrop",
    "maxGradNorm",
    "zeroStage",
    "optimizer",
    "microBatchSize",
    "offload",
)


def _world(s: Any) -> int:
    return int(s.resources.nodes * max(s.resources.gpus_per_node, 1))


def _has_validation(s: Any) -> bool:
    d = s.data
    return d.validation is not None or d.validation_sources is not None or d.validation_fraction > 0


_HUB_FIELDS = ("config", "split", "files")


def _names_unique(d: Any) -> bool:
    names = [source.name for _, source, _ in d.all_sources()]
    return len(set(names)) == len(names)


def _hub_fields_on_hub(d: Any) -> bool:
    return all(
        s.uri.startswith(HUB_DATASET_PREFIX) or all(getattr(s, f) is None for f in _HUB_FIELDS)
        for _, s, _ in d.all_sources()
    )


def _sources_cel(check: str) -> str:
    """`check` (on a source `s`) for every item of sources and validationSources."""
    return " && ".join(
        f"(!has(self.{lst}) || self.{lst}.all(s, {check}))"
        for lst in ("sources", "validationSources")
    )


#: Names are unique within and across both lists, and none is a name the plan gives a plain
#: data.train / data.validation entry of the other split (train-<i>, validation-<i>).
_UNIQUE_NAMES_CEL = " && ".join(
    [
        *(
            f"(!has(self.{lst}) || self.{lst}.all(s, self.{lst}.exists_one(t, t.name == s.name)))"
            for lst in ("sources", "validationSources")
        ),
        "(!has(self.sources) || !has(self.validationSources) || "
        "self.validationSources.all(s, !self.sources.exists(t, t.name == s.name)))",
        "(!has(self.sources) || !has(self.validation) || "
        "self.sources.all(s, !s.name.matches('^validation-[0-9]+$')))",
        "(!has(self.validationSources) || !has(self.train) || "
        "self.validationSources.all(s, !s.name.matches('^train-[0-9]+$')))",
    ]
)


RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- the resource and its name
    Rule(
        "name-length",
        "",
        "metadata.name",
        lambda root: len(root.metadata.name) <= MAX_NAME_LENGTH,
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"is longer than {MAX_NAME_LENGTH} characters (child objects append suffixes)",
        "use a shorter name",
    ),
    Rule(
        "name-dns-1035",
        "",
        "metadata.name",
        lambda root: re.fullmatch(DNS1035, root.metadata.name) is not None,
        f"self.metadata.name.matches('{DNS1035}')",
        "must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter)",
        "rename the run",
    ),
    Rule(
        "from-run-not-itself",
        "",
        "spec.model.fromRun",
        lambda root: root.spec.model.from_run != root.metadata.name,
        "!has(self.spec.model.fromRun) || self.spec.model.fromRun != self.metadata.name",
        "names this run itself",
        "name the run whose output this run starts from",
    ),
    # ---------------------------------------------------------------------------- model
    Rule(
        "model-one-source",
        "spec.model",
        "",
        lambda m: sum(v is not None for v in (m.uri, m.architecture, m.from_run)) == 1,
        "(has(self.uri) ? 1 : 0) + (has(self.architecture) ? 1 : 0) + (has(self.fromRun) ? 1 : 0)"
        " == 1",
        "needs exactly one of uri, architecture and fromRun",
        "keep one: uri for a pretrained model, architecture to build one, fromRun to chain",
    ),
    Rule(
        "heads-divide-hidden-size",
        "spec.model.architecture",
        "heads",
        lambda a: a.hidden_size % a.heads == 0,
        "self.hiddenSize % self.heads == 0",
        "must divide hiddenSize",
        "choose heads so that hiddenSize / heads is an integer",
    ),
    Rule(
        "kv-heads-divide-heads",
        "spec.model.architecture",
        "kvHeads",
        lambda a: a.kv_heads is None or a.heads % a.kv_heads == 0,
        "!has(self.kvHeads) || self.heads % self.kvHeads == 0",
        "must divide heads",
        "use a divisor of heads",
    ),
    # ------------------------------------------------------------------------ tokenizer
    Rule(
        "tokenizer-one-source",
        "spec.tokenizer",
        "",
        lambda t: t.uri is None or t.train is None,
        "!(has(self.uri) && has(self.train))",
        "uri and train are mutually exclusive",
        "keep one of them",
    ),
    Rule(
        "tokenizer-train-needs-architecture",
        "spec",
        "tokenizer.train",
        lambda s: s.tokenizer.train is None or s.model.architecture is not None,
        "!has(self.tokenizer.train) || has(self.model.architecture)",
        "is only allowed with model.architecture",
        "remove tokenizer.train; a pretrained model brings its own tokenizer",
    ),
    Rule(
        "architecture-needs-tokenizer",
        "spec",
        "tokenizer",
        lambda s: s.model.architecture is None or s.tokenizer.train or s.tokenizer.uri,
        "!has(self.model.architecture) || has(self.tokenizer.train) || has(self.tokenizer.uri)",
        "a model built from model.architecture needs a tokenizer",
        "set tokenizer.train (e.g. {vocabSize: 8000}) or tokenizer.uri",
    ),
    Rule(
        "vocab-fits-embeddings",
        "spec",
        "model.architecture.vocabSize",
        lambda s: (
            s.model.architecture is None
            or s.model.architecture.vocab_size is None
            or s.tokenizer.train is None
            or s.model.architecture.vocab_size >= s.tokenizer.train.vocab_size
        ),
        "!has(self.model.architecture) || !has(self.model.architecture.vocabSize) || "
        "!has(self.tokenizer.train) || "
        "self.model.architecture.vocabSize >= self.tokenizer.train.vocabSize",
        "is smaller than tokenizer.train.vocabSize",
        "remove vocabSize (it follows the tokenizer) or make it at least the tokenizer's",
        trainer="a loaded tokenizer's vocabulary against the model's embeddings (model.py)",
    ),
    Rule(
        "block-fits-context",
        "spec",
        "data.blockSize",
        lambda s: (
            s.model.architecture is None or s.data.block_size <= s.model.architecture.context_length
        ),
        "!has(self.model.architecture) || "
        "self.data.blockSize <= self.model.architecture.contextLength",
        "exceeds model.architecture.contextLength",
        "lower blockSize or raise contextLength",
        trainer="blockSize against a pretrained model's max_position_embeddings (model.py)",
    ),
    # ----------------------------------------------------------------------------- data
    Rule(
        "validation-files-or-fraction",
        "spec.data",
        "validationFraction",
        lambda d: d.validation is None or d.validation_fraction == 0,
        "!has(self.validation) || self.validationFraction == 0.0",
        "is set together with validation files",
        "keep validation or validationFraction, not both",
    ),
    Rule(
        "train-or-sources",
        "spec.data",
        "sources",
        lambda d: (d.train is None) != (d.sources is None),
        "has(self.train) != has(self.sources)",
        "needs exactly one of train and sources",
        "list plain files in train, or sources with their own terms — not both",
    ),
    Rule(
        "validation-sources-exclusive",
        "spec.data",
        "validationSources",
        lambda d: (
            d.validation_sources is None or (d.validation is None and d.validation_fraction == 0)
        ),
        "!has(self.validationSources) || (!has(self.validation) && self.validationFraction == 0.0)",
        "is set together with validation or validationFraction",
        "keep one way to name validation data: validationSources, validation or validationFraction",
    ),
    Rule(
        "source-names-unique",
        "spec.data",
        "sources",
        _names_unique,
        _UNIQUE_NAMES_CEL,
        "names a source twice (names are unique across sources and validationSources; plain "
        "data.train and data.validation entries are train-<i> and validation-<i>)",
        "give every source its own name",
    ),
    Rule(
        "hub-fields-need-hub-dataset",
        "spec.data",
        "sources",
        _hub_fields_on_hub,
        _sources_cel(
            f"s.uri.startsWith('{HUB_DATASET_PREFIX}') || "
            + "!("
            + " || ".join(f"has(s.{f})" for f in _HUB_FIELDS)
            + ")"
        ),
        "a source sets config, split or files without an hf://datasets/ URI",
        "remove them: they select the files of a Hub dataset only",
    ),
    Rule(
        "validation-fraction-below-one",
        "spec.data",
        "validationFraction",
        lambda d: d.validation_fraction < 1,
        "self.validationFraction < 1.0",
        "must be below 1",
        "use e.g. 0.01",
    ),
    Rule(
        "chat-template-needs-chat-data",
        "spec.data",
        "chatTemplate",
        lambda d: d.chat_template is None or d.format != "text",
        "!has(self.chatTemplate) || self.format != 'text'",
        "applies to chat and preference data only",
        "remove it",
    ),
    Rule(
        "document-separator-needs-text-paragraphs",
        "spec.data",
        "documentSeparator",
        lambda d: d.document_separator is None or (d.format, d.text_split) == ("text", "paragraph"),
        "!has(self.documentSeparator) || (self.format == 'text' && self.textSplit == 'paragraph')",
        "splits the documents of text data (textSplit paragraph) only",
        "remove it, or use format text with textSplit paragraph",
    ),
    Rule(
        "stage-fits-format",
        "spec",
        "data.format",
        lambda s: s.data.format in METHOD_FORMATS[s.method.stage],
        _method_formats_cel(),
        "does not fit method.stage",
        _method_formats_text(),
    ),
    # --------------------------------------------------------------------------- method
    Rule(
        "dpo-settings-need-dpo",
        "spec.method",
        "dpo",
        lambda m: m.dpo is None or m.stage == "dpo",
        "!has(self.dpo) || self.stage == 'dpo'",
        "is set but stage is not dpo",
        "remove it or use stage: dpo",
    ),
    Rule(
        "dpo-needs-trained-policy",
        "spec",
        "model.architecture",
        lambda s: s.method.stage != "dpo" or s.model.architecture is None,
        "self.method.stage != 'dpo' || !has(self.model.architecture)",
        "stage dpo needs a trained policy, not random weights",
        "use model.uri or model.fromRun (e.g. an SFT run)",
    ),
    Rule(
        "pretrain-without-adapter",
        "spec",
        "method.adapter.type",
        lambda s: s.method.stage != "pretrain" or s.method.adapter.type == "none",
        "self.method.stage != 'pretrain' || self.method.adapter.type == 'none'",
        "adapters fine-tune a trained model; pretraining trains all weights",
        "use adapter.type: none for stage pretrain",
    ),
    Rule(
        "no-adapter-on-random-weights",
        "spec",
        "method.adapter.type",
        lambda s: s.model.architecture is None or s.method.adapter.type == "none",
        "!has(self.model.architecture) || self.method.adapter.type == 'none'",
        "an adapter on random weights learns nothing useful",
        "use adapter.type: none with model.architecture",
    ),
    Rule(
        "qlora-not-with-zero-3",
        "spec",
        "distributed.zeroStage",
        lambda s: s.method.adapter.type != "qlora" or s.distributed.zero_stage < 3,
        "self.method.adapter.type != 'qlora' || self.distributed.zeroStage < 3",
        "3 with qlora needs a matching bnb_4bit_quant_storage, which kubetrain does not set",
        "use zeroStage 0, 1 or 2 with qlora, or adapter lora",
    ),
    # -------------------------------------------------------------- training and distribution
    Rule(
        "epochs-or-max-steps",
        "spec.training",
        "epochs",
        lambda t: t.epochs is None or t.max_steps is None,
        "!(has(self.epochs) && has(self.maxSteps))",
        "is set together with maxSteps",
        "keep one of them",
    ),
    Rule(
        "offload-needs-zero-2",
        "spec.distributed",
        "offload",
        lambda d: d.offload == "none" or d.zero_stage >= 2,
        "self.offload == 'none' || self.zeroStage >= 2",
        "needs zeroStage 2 or 3",
        "set zeroStage: 2 or 3",
        trainer="offload in the DeepSpeed config against zeroStage (train.py)",
    ),
    Rule(
        "8bit-optimizer-not-sharded",
        "spec",
        "training.optimizer",
        lambda s: (
            not _eight_bit(s.training.optimizer) or s.distributed.zero_stage == 0 or _world(s) == 1
        ),
        "!"
        + _EIGHT_BIT_CEL.replace("OPT", "self.training.optimizer")
        + " || self.distributed.zeroStage == 0 || self.resources.nodes * "
        "(self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1) == 1",
        "bitsandbytes optimizer state is not sharded by DeepSpeed ZeRO on more than one process",
        "use adamw_torch, or zeroStage: 0",
        trainer="the same, with the launcher's world size (train.py)",
    ),
    Rule(
        "bf16-weights-need-bf16",
        "spec.training",
        "weightPrecision",
        lambda t: t.weight_precision != "bf16" or t.precision == "bf16",
        "self.weightPrecision != 'bf16' || self.precision == 'bf16'",
        "bf16 weights need precision bf16",
        "set precision: bf16, or weightPrecision: fp32",
    ),
    Rule(
        "flash-attention-needs-16-bit-gpu",
        "spec",
        "training.attention",
        lambda s: (
            s.training.attention != "flash_attention_2"
            or (s.resources.gpus_per_node > 0 and s.training.precision != "fp32")
        ),
        "self.training.attention != 'flash_attention_2' || "
        "(self.resources.gpusPerNode > 0 && self.training.precision != 'fp32')",
        "flash_attention_2 runs on GPUs in bf16 or fp16 only",
        "use sdpa, or train on GPUs in bf16",
        trainer="the flash-attn package missing from the trainer image (model.py)",
    ),
    Rule(
        "fp16-needs-gpu",
        "spec",
        "training.precision",
        lambda s: s.training.precision != "fp16" or s.resources.gpus_per_node > 0,
        "self.training.precision != 'fp16' || self.resources.gpusPerNode > 0",
        "fp16 needs a GPU (resources.gpusPerNode is 0)",
        "use bf16 or fp32 on CPU",
        trainer="fp16 without CUDA (train.py)",
    ),
    Rule(
        "qlora-not-fp32-on-gpu",
        "spec",
        "training.precision",
        lambda s: (
            s.method.adapter.type != "qlora"
            or s.training.precision != "fp32"
            or s.resources.gpus_per_node == 0
        ),
        "self.method.adapter.type != 'qlora' || self.training.precision != 'fp32' || "
        "self.resources.gpusPerNode == 0",
        "qlora computes in bf16 or fp16 on GPUs",
        "use bf16",
        trainer="qlora in fp32 when CUDA is there (train.py)",
    ),
    # --------------------------------------------------------------------------- resources
    Rule(
        "merge-gpu-only-on-gpu-runs",
        "spec",
        "resources.merge.gpus",
        lambda s: not s.resources.merge.gpus or s.resources.gpus_per_node > 0,
        "!has(self.resources.merge.gpus) || self.resources.merge.gpus == 0 || "
        "self.resources.gpusPerNode > 0",
        "asks for a GPU on a CPU run (resources.gpusPerNode is 0)",
        "remove it, or set resources.gpusPerNode",
    ),
    # ----------------------------------------------------------------------------- sanity
    Rule(
        "sanity-rungs-or-single-gate",
        "spec.sanity",
        "rungs",
        lambda g: g.rungs is None or all(getattr(g, f) is None for f in g.gate_fields()),
        "!has(self.rungs) || !(" + " || ".join(f"has(self.{f})" for f in _SANITY_GATE_FIELDS) + ")",
        "is set together with the single-gate fields (gpus, steps, …)",
        "move those fields into the rungs, or remove rungs for a single gate",
    ),
    # ----------------------------------------------------------------------------- output
    Rule(
        "merge-needs-adapter",
        "spec",
        "output.merge",
        lambda s: not s.output.merge or s.method.adapter.type != "none",
        "!self.output.merge || self.method.adapter.type != 'none'",
        "there is no adapter to merge (method.adapter.type is none)",
        "remove output.merge, or train an adapter (lora or qlora)",
    ),
    Rule(
        "merge-not-into-quantized-base",
        "spec",
        "output.merge",
        lambda s: not s.output.merge or not s.model.quantized,
        "!self.output.merge || !self.model.quantized",
        "the base at model.uri is declared quantized; merging into a 4-bit base corrupts the model",
        "point model.uri at the full-precision base",
        trainer="a base whose config says it is quantized (merge.py)",
    ),
    Rule(
        "max-perplexity-needs-validation",
        "spec",
        "output.maxPerplexity",
        lambda s: s.output.max_perplexity is None or _has_validation(s),
        "!has(self.output.maxPerplexity) || has(self.data.validation) || "
        "has(self.data.validationSources) || self.data.validationFraction > 0.0",
        "needs a validation split to measure perplexity on",
        "set data.validation, data.validationSources or data.validationFraction, or remove "
        "maxPerplexity",
    ),
    # ---------------------------------------------------------------------------- storage
    Rule(
        "s3-endpoint-https",
        "spec.storage.s3",
        "endpoint",
        lambda s3: not s3.endpoint.startswith("http://") or s3.allow_insecure_endpoint,
        "!self.endpoint.startsWith('http://') || self.allowInsecureEndpoint",
        "is plain http: credentials and data would cross the network unencrypted",
        "use https://, or set allowInsecureEndpoint: true for a test store on a trusted network",
    ),
    Rule(
        "hf-endpoint-https",
        "spec.storage.hf",
        "endpoint",
        lambda hf: not hf.endpoint.startswith("http://"),
        "!self.endpoint.startsWith('http://')",
        "is plain http: the Hub token would cross the network unencrypted",
        "use an https:// endpoint",
    ),
)

RUNG_RULES: tuple[RungRule, ...] = (
    RungRule(
        "rung-gpus-within-run",
        "gpus",
        lambda s, r: r.gpus is None or r.gpus <= s.resources.nodes * s.resources.gpus_per_node,
        "!has(r.gpus) || r.gpus <= self.resources.nodes * self.resources.gpusPerNode",
        "a sanity rung asks for more GPUs than the run has (nodes × gpusPerNode)",
        "use at most that many",
    ),
    RungRule(
        "rung-gpus-fill-nodes",
        "gpus",
        lambda s, r: (
            r.gpus is None
            or s.resources.gpus_per_node == 0
            or r.gpus <= s.resources.gpus_per_node
            or r.gpus % s.resources.gpus_per_node == 0
        ),
        "!has(r.gpus) || self.resources.gpusPerNode == 0 || r.gpus <= self.resources.gpusPerNode"
        " || r.gpus % self.resources.gpusPerNode == 0",
        "a sanity rung wider than one node must fill whole nodes (a multiple of gpusPerNode)",
        "use at most gpusPerNode, or a multiple of it",
    ),
    RungRule(
        "rung-8bit-optimizer-not-sharded",
        "optimizer",
        lambda s, r: (
            not _eight_bit(r.optimizer or s.training.optimizer)
            or (s.distributed.zero_stage if r.zero_stage is None else r.zero_stage) == 0
            or (r.gpus or 0) <= 1
        ),
        "!"
        + _EIGHT_BIT_CEL.replace(
            "OPT", "(has(r.optimizer) ? r.optimizer : self.training.optimizer)"
        )
        + " || (has(r.zeroStage) ? r.zeroStage : self.distributed.zeroStage) == 0"
        " || !has(r.gpus) || r.gpus <= 1",
        "a sanity rung with a bitsandbytes optimizer and ZeRO on more than one GPU: its state is "
        "not sharded by DeepSpeed",
        "use adamw_torch on that rung, or zeroStage: 0",
        trainer="the same, with the launcher's world size (train.py)",
    ),
    RungRule(
        "rung-offload-needs-zero-2",
        "offload",
        lambda s, r: (
            r.offload in (None, "none")
            or (s.distributed.zero_stage if r.zero_stage is None else r.zero_stage) >= 2
        ),
        "!has(r.offload) || r.offload == 'none' || "
        "(has(r.zeroStage) ? r.zeroStage : self.distributed.zeroStage) >= 2",
        "a sanity rung offloads to CPU with a ZeRO stage below 2 (a rung below ZeRO-2 that only "
        "inherits distributed.offload runs without it)",
        "set the rung's zeroStage to 2 or 3, or remove its offload",
        trainer="offload in the DeepSpeed config against zeroStage (train.py)",
    ),
    RungRule(
        "rung-fp16-needs-gpu",
        "gpus",
        lambda s, r: s.training.precision != "fp16" or r.gpus is None or r.gpus > 0,
        "self.training.precision != 'fp16' || !has(r.gpus) || r.gpus > 0",
        "a CPU sanity rung (gpus 0) cannot train in fp16",
        "give the rung a GPU, or use bf16",
        trainer="fp16 without CUDA (train.py)",
    ),
)


def rung_items(spec: Any) -> Iterator[tuple[str, Any]]:
    """(path, rung) of every rung of a spec's sanity ladder, as the user wrote it."""
    if spec.sanity is None:
        return
    if spec.sanity.rungs is None:
        yield "spec.sanity", spec.sanity
        return
    for index, rung in enumerate(spec.sanity.rungs):
        yield f"spec.sanity.rungs[{index}]", rung


def node_at(root: Any, dotted: str) -> Any:
    """The parsed node at a dotted path (camelCase names), or None where it is absent."""
    node = root
    for name in filter(None, dotted.split(".")):
        if node is None:
            return None
        node = getattr(node, re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(), None)
    return node


def problems(root: Any, valid: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """(path, `problem — fix`) for every rule the parsed run breaks.

    `valid` is the set of spec sections (and `metadata`) that parsed; a rule (or rung rule) that
    reads any other is skipped, the others run, so a field error and a cross-field error that does
    not read its section are reported in the same pass.
    """
    found: list[tuple[str, str]] = []
    for rule in RULES:
        if valid is not None and not rule.sections() <= valid:
            continue
        node = node_at(root, rule.at)
        if node is not None and not rule.check(node):
            found.append((rule.path, f"{rule.message} — {rule.fix}"))
    spec = root.spec
    rung_rules = [r for r in RUNG_RULES if valid is None or r.sections() <= valid]
    if rung_rules:
        for path, rung in rung_items(spec):
            for rung_rule in rung_rules:
                if not rung_rule.check(spec, rung):
                    where = f"{path}.{rung_rule.field}"
                    found.append((where, f"{rung_rule.message} — {rung_rule.fix}"))
    return found
