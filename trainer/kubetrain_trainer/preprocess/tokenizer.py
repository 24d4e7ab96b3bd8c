"""The dataset's tokenizer: trained here (byte-level BPE) or loaded from a directory; templates.

Whatever its origin, the tokenizer is saved into the dataset (`tokenizer/`, transformers' layout:
`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) and every worker loads it from
there, so the data and the tokenizer the trainer gets can never disagree. Nothing comes from the
hub: directories are loaded with `local_files_only=True`.

Chat templates are Jinja strings rendered by `apply_chat_template`. The named ones carry
`{% generation %}` markers so transformers' own assistant mask can be compared with ours in tests;
our masks never depend on them (see :class:`ChatRenderer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetrain_trainer import storage
from kubetrain_trainer.config import PreprocessConfig
from kubetrain_trainer.preprocess.rows import Message
from kubetrain_trainer.stage import InvalidInput, failure

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: The files that make a tokenizer (fetched from a model directory, hashed into the cache key).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # open-instruct's tulu template
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # Meta's Llama 3 template without tools and dates
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
#: Markers of each named template: a tokenizer trained for chat data learns them as special tokens.
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "tulu": ["<|system|>", "<|user|>", "<|assistant|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


@dataclass(frozen=True)
class TokenizerPlan:
    """What the cache key needs before any work: the tokenizer's origin and identity."""

    fingerprint: str
    template: str | None
    source_dir: Path | None
    """A local directory to load from; None: train one."""
    special_tokens: tuple[str, ...] = ()
    vocab_size: int = 0
    min_frequency: int = 0


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest and the packers need to know about the saved tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int
    splits_at_lines: bool
    """Encoding a text in pieces cut at line starts gives the same ids (see encode.split_lines)."""


def dir_fingerprint(directory: Path) -> str:
    """sha256 over the tokenizer files present (names and contents)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            digest.update(f"{name}\0{storage.sha256_file(path)}\0".encode())
    return f"sha256:{digest.hexdigest()}"


def plan(config: PreprocessConfig, cache_dir: Path) -> TokenizerPlan:
    """Resolve the tokenizer source (fetching an S3 directory's tokenizer files only)."""
    named = TEMPLATES.get(config.chat_template or "")
    needs_template = config.format != "text"
    if config.tokenizer.train is not None:
        spec = config.tokenizer.train
        specials = list(spec.special_tokens)
        if config.chat_template:
            specials += [t for t in TEMPLATE_TOKENS[config.chat_template] if t not in specials]
        if needs_template and named is None:
            raise InvalidInput(
                "chatTemplate: a tokenizer trained here has no chat template — name one "
                f"({', '.join(TEMPLATES)}) for format {config.format}"
            )
        recipe = {
            "algorithm": "byte-level-bpe",
            "vocabSize": spec.vocab_size,
            "specialTokens": specials,
            "minFrequency": spec.min_frequency,
        }
        fingerprint = "train:" + json.dumps(recipe, sort_keys=True, separators=(",", ":"))
        return TokenizerPlan(
            fingerprint,
            named if needs_template else None,
            None,
            tuple(specials),
            spec.vocab_size,
            spec.min_frequency,
        )
    assert config.tokenizer.uri is not None
    uri = config.tokenizer.uri
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    try:
        directory = storage.download_dir(uri, target, config.s3, patterns=TOKENIZER_FILES)
        if not (storage.is_s3(uri) or storage.is_hf(uri)):  # copied into the dataset as found
            _check_files(uri, directory)
    except storage.StorageError as error:  # its own exit code: missing (2) or transient (1)
        raise failure(error.exit_code, f"tokenizer.uri: {error.message}") from None
    if not (directory / "tokenizer.json").is_file():
        raise InvalidInput(
            f"tokenizer.uri: {uri} has no tokenizer.json — the fast (Rust) tokenizer is required; "
            "save it with transformers' save_pretrained to create one"
        )
    _check_loads(directory / "tokenizer.json", uri)
    template = named
    if needs_template and template is None:
        template = _own_template(directory)
        if template is None:
            raise InvalidInput(
                f"tokenizer.uri: {uri} has no chat template — set chatTemplate to one of "
                f"{', '.join(TEMPLATES)}"
            )
    return TokenizerPlan(
        dir_fingerprint(directory), template if needs_template else None, directory
    )


def size(plan: TokenizerPlan) -> int:
    """Tokens in the planned tokenizer, added tokens included (what `len(tokenizer)` says and
    what a model built from an architecture sizes its embeddings by): the loaded tokenizer's, or
    a trained one's declared vocabulary (training yields at most that many)."""
    if plan.source_dir is None:
        return plan.vocab_size
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(plan.source_dir / "tokenizer.json"))
    return int(backend.get_vocab_size(with_added_tokens=True))


def _check_files(uri: str, directory: Path) -> None:
    """Exit 2 naming the file unless every tokenizer file of a local directory is a regular
    file inside its claim or directory: a `merges.txt` linked to `/proc/self/environ` would be
    copied, the pod's credentials with it, into the dataset's `tokenizer/`."""
    for name in TOKENIZER_FILES:
        if os.path.lexists(directory / name):
            storage.check_local_input(storage.join(uri, name))


def _check_loads(path: Path, uri: str) -> None:
    """Exit 2 now, naming the file, for a tokenizer.json the Rust tokenizer cannot read."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception for a malformed file
        raise InvalidInput(
            f"tokenizer.uri: {uri}: {path.name} does not load ({error}) — it is truncated or "
            "from an incompatible release: save the tokenizer again with save_pretrained"
        ) from None


def _own_template(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    return None


#: The longest word (a run of non-space, or of space, characters) the BPE trainer sees. Its merge
#: phase rewrites every word at every merge, so one word's cost grows with its length squared: a
#: 1 MiB word took minutes, 16 MiB ran 766 s of CPU in Rust, where SIGTERM waits. Longer runs are
#: cut into pieces of this length for training only; encoding sees the text whole and stays
#: lossless (it merges by rank in n log n), and real words are far shorter than 1,000 characters.
MAX_WORD_CHARS = 1000
_LONG_RUN = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}|\s{{{MAX_WORD_CHARS + 1},}}")


def bounded_words(text: str) -> list[str]:
    """The text with every run longer than MAX_WORD_CHARS cut into pieces of at most that size.

    Pieces are separate strings, so no pre-token of byte-level BPE spans a cut.
    """
    if len(text) <= MAX_WORD_CHARS:
        return [text]
    pieces, start = [], 0
    for match in _LONG_RUN.finditer(text):
        pieces.append(text[start : match.start()])
        pieces += [
            text[i : min(i + MAX_WORD_CHARS, match.end())]
            for i in range(match.start(), match.end(), MAX_WORD_CHARS)
        ]
        start = match.end()
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def _bounded(batches: Iterable[list[str]]) -> Iterator[list[str]]:
    for batch in batches:
        yield [piece for text in batch for piece in bounded_words(text)]


def train(batches: Iterable[list[str]], plan: TokenizerPlan) -> Tokenizer:
    """Byte-level BPE trained from a stream of document batches (never the whole corpus).

    Words are cut at MAX_WORD_CHARS first, so the Rust merge phase, in which no Python signal
    handler runs, stays short: SIGTERM raised while batches are pulled ends training at once,
    and one arriving during the merges waits seconds, not minutes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=plan.vocab_size,
        min_frequency=plan.min_frequency,
        special_tokens=list(plan.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_bounded(batches), trainer)
    return tokenizer


def load(directory: Path) -> Any:
    """A transformers tokenizer from a local directory (never the hub), without importing torch."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{directory}: cannot load the tokenizer: {error}") from None


def _copy(source: Path, dest: Path, template: str | None) -> None:
    """The model's tokenizer files as they are; a named template replaces the model's own."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (template and name == "chat_template.json"):
            shutil.copyfile(source / name, dest / name)
    if template is None:
        return
    (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = dest / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if "chat_template" in config:
            config["chat_template"] = template
            config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save(plan: TokenizerPlan, trained: Tokenizer | None, dest: Path) -> TokenizerInfo:
    """Write the dataset's tokenizer directory and describe it."""
    if trained is not None:
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=trained, eos_token=plan.special_tokens[0]
        )
        hf.chat_template = plan.template
        hf.save_pretrained(str(dest))
    else:
        assert plan.source_dir is not None
        _copy(plan.source_dir, dest, plan.template)
    return describe(dest)


def _special_token(directory: Path, name: str) -> str | None:
    """A special token's text as transformers stores it: a string or an AddedToken object."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / file
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                return value
    return None


def describe(directory: Path) -> TokenizerInfo:
    """Vocabulary size, EOS and padding ids of a saved tokenizer.

    Read with `tokenizers` and the JSON files, not transformers: the text path of the stage never
    imports transformers (~20 MB of RSS, a second of start-up).
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = {}
    for name in ("eos_token", "pad_token"):
        token = _special_token(directory, name)
        ids[name] = None if token is None else backend.token_to_id(token)
    if ids["eos_token"] is None:
        raise InvalidInput(
            "tokenizer: it has no eos_token — documents are joined and padded with it; "
            "set eos_token in tokenizer_config.json"
        )
    eos = int(ids["eos_token"])
    pad = eos if ids["pad_token"] is None else int(ids["pad_token"])
    vocab = backend.get_vocab_size(with_added_tokens=True)
    return TokenizerInfo(vocab, eos, pad, splits_at_lines(backend))


#: Code, prose, indentation, tabs, blank lines, non-ASCII text and a special token's text.
_PROBE = (
    "import os\nclass Box(object):\n    def f(self, x=1):\n        return x * 2  # twice\n\n\n"
    '\tTabbed\n\u00e9t\u00e9 na\u00efve \u6f22\u5b57 \u0436\n"quoted" [1, 2, 3]\n'
    "<|endoftext|> stays text\n  last line\nend"
)


def splits_at_lines(backend: Tokenizer) -> bool:
    """Whether this tokenizer encodes the probe identically whole and cut at line starts.

    True for byte-level BPE by construction (a newline before a non-space character always ends
    a pre-token); false e.g. for SentencePiece-style tokenizers that prepend "▁" to every input.
    Such tokenizers get long documents whole (memory then grows with the longest document).
    """
    backend.encode_special_tokens = True
    whole = backend.encode(_PROBE, add_special_tokens=False).ids
    parts = [backend.encode(p, add_special_tokens=False).ids for p in split_lines(_PROBE, 1)]
    return bool(whole == [i for part in parts for i in part])


#: Text documents longer than this are encoded in pieces of about this size (encode.BATCH_CHARS).
PIECE_CHARS = 64 << 10
_LINE_START = re.compile(r"(?<=\n)(?=\S)")


def split_lines(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """A long text cut after newlines that precede a non-space character, ~piece_chars each.

    Such a newline always ends a pre-token of byte-level BPE (GPT-2 and Llama 3 patterns), so the
    pieces encode to the same ids as the whole; `splits_at_lines` checks a tokenizer first.
    """
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    for match in _LINE_START.finditer(text):
        if match.start() - start >= piece_chars:
            pieces.append(text[start : match.start()])
            start = match.start()
    pieces.append(text[start:])
    return pieces


class TemplateError(ValueError):
    """The template renders a conversation's prefix differently from the whole: no exact mask."""


class ChatRenderer:
    """Renders rows with the chat template and finds the assistant spans in the rendering.

    An assistant turn's span is the text between the rendering of the turns before it with the
    generation prompt and the rendering through it — the open-instruct method. It needs only that
    rendering a prefix of the conversation gives a prefix of the text, which holds for the named
    templates and most model templates; when it does not, the row cannot be masked exactly and the
    stage stops (TemplateError) instead of training on a wrong mask.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(text)

    def conversation(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise TemplateError(f"turn {i}: the template is not prefix-stable")
            spans.append((len(before), len(through)))
        return full, spans

    def preference(self, prompt: list[Message], chosen: str, rejected: str) -> tuple[str, str, str]:
        """The rendered prompt (with the generation prompt) and the two rendered completions."""
        head = self.render(prompt, generation_prompt=True)
        tails = []
        for answer in (chosen, rejected):
            full = self.render([*prompt, {"role": "assistant", "content": answer}])
            if not full.startswith(head):
                raise TemplateError("the prompt renders differently inside the conversation")
            tails.append(full[len(head) :])
        return head, tails[0], tails[1]
