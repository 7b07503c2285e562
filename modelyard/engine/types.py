"""Request / SamplingParams / Output: the engine's public data types (plain, picklable)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # per-request generator: same tokens whatever else is in the batch
    ignore_eos: bool = False  # exactly max_new_tokens: EOS is an ordinary token, generated if likely, not a stop

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @classmethod
    def from_dict(cls, d: dict | None) -> SamplingParams:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling options: {sorted(unknown)}")
        return cls(**d)


@dataclass
class Request:
    """One image (or a list of images, where the model supports it) and the user's text.

    `image`: a PIL image, bytes, a filesystem path (str or Path), or a list of those.
    `prompt`: the user text; the checkpoint's own chat template and image placeholder format it.
    """

    image: Any
    prompt: str = "Describe the image."
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None

    def __post_init__(self):
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"


@dataclass
class Output:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_image_tokens: int = 0
    timings: dict = field(default_factory=dict)  # queue / prefill / decode seconds

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "error": self.error,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_image_tokens": self.num_image_tokens,
            "timings": dict(self.timings),
        }
