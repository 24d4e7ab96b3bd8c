"""The model card (`README.md`) of `final/`, `merged/` and the run's output, via huggingface_hub.

`base_model` in the card's metadata is set only for a Hub id (`hf://org/name` → `org/name`): a
local or bucket path means nothing to the Hub and would make the card invalid there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FROM_SCRATCH = "(trained from scratch)"

CARD = """---
{{ card_data }}
---

# {{ run }}

{{ summary }}

| | |
|---|---|
| method | {{ method }} |
| base model | `{{ base }}` |
| adapter | {{ adapter }} |
| optimizer steps | {{ steps }} |
| dataset | `{{ dataset }}` ({{ train_tokens }} training tokens, block size {{ block_size }}) |
| validation perplexity | {{ perplexity }} ({{ eval_tokens }} tokens) |
| precision | {{ precision }} |

Trained and exported by kubetrain. Load it with
`AutoModelForCausalLM.from_pretrained("<this directory>")`; the tokenizer is saved alongside.
"""


def hub_id(uri: str) -> str | None:
    """`hf://org/name[@rev]` → `org/name`; None for anything else."""
    if not uri.startswith("hf://"):
        return None
    return uri.removeprefix("hf://").strip("/").partition("@")[0] or None


def write(directory: Path, fields: dict[str, Any]) -> str:
    """Render the card into directory/README.md; returns its text."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="transformers",
        base_model=hub_id(str(fields["base"])),
        tags=["kubetrain", fields["method"], *(["lora"] if fields["adapter"] != "none" else [])],
    )
    text = str(ModelCard.from_template(card_data, template_str=CARD, **fields))
    (directory / "README.md").write_text(text, encoding="utf-8")
    return text
