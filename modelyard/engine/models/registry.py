"""Which HF architectures the native engine implements, keyed by `config.architectures[0]`.

Model modules are imported only when a checkpoint asks for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture (or a feature of it) has no native implementation."""


_FALLBACK_HINT = 'load it with EngineConfig(backend="transformers") instead'


@dataclass(frozen=True)
class ArchSupport:
    module: str  # relative to this package
    class_name: str
    text_model_types: frozenset[str]  # text_config.model_type values the class implements
    vision_model_types: frozenset[str]  # vision_config.model_type values


SUPPORTED_ARCHITECTURES = MappingProxyType(
    {
        "LlavaForConditionalGeneration": ArchSupport(
            module=".llava",
            class_name="LlavaForConditionalGeneration",
            text_model_types=frozenset({"llama", "mistral", "qwen2"}),
            vision_model_types=frozenset({"clip_vision_model", "siglip_vision_model"}),
        ),
    }
)


def _architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise UnsupportedArchitecture(
            f"the checkpoint config names no architecture (config.architectures is empty); {_FALLBACK_HINT}"
        )
    return archs[0]


def get_model_class(hf_config) -> type:
    """The NativeVLM subclass for this HF config, or UnsupportedArchitecture saying why not."""
    arch = _architecture(hf_config)
    support = SUPPORTED_ARCHITECTURES.get(arch)
    if support is None:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not implemented by the native engine (supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}); {_FALLBACK_HINT}"
        )
    text_type = getattr(getattr(hf_config, "text_config", None), "model_type", None)
    vision_type = getattr(getattr(hf_config, "vision_config", None), "model_type", None)
    if text_type not in support.text_model_types:
        raise UnsupportedArchitecture(
            f"{arch} with a {text_type!r} language model is not implemented natively (supported: "
            f"{sorted(support.text_model_types)}); {_FALLBACK_HINT}"
        )
    if vision_type not in support.vision_model_types:
        raise UnsupportedArchitecture(
            f"{arch} with a {vision_type!r} vision tower is not implemented natively (supported: "
            f"{sorted(support.vision_model_types)}); {_FALLBACK_HINT}"
        )
    module = importlib.import_module(support.module, __package__)
    return getattr(module, support.class_name)
