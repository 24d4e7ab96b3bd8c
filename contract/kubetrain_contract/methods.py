"""Which data formats each training method trains on: the operator refuses a mismatched spec
before anything runs, and the trainer refuses a mismatched dataset it is handed anyway."""

from typing import Final, Literal

Method = Literal["pretrain", "sft", "dpo"]
DataFormat = Literal["text", "chat", "preference"]

METHOD_FORMATS: Final[dict[Method, tuple[DataFormat, ...]]] = {
    "pretrain": ("text",),
    "sft": ("text", "chat"),
    "dpo": ("preference",),
}
