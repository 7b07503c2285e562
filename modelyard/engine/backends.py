"""Which backend runs a checkpoint, and the load errors that name what to fix.

EngineConfig(backend="auto"), the default, takes the native engine where it implements the
checkpoint (its architecture, decoder, vision tower, RoPE and context length) and otherwise the
transformers fallback, where transformers can load the checkpoint as image-text-to-text. A
checkpoint neither can run is refused, naming its architecture. Every refusal here is a ValueError
or ImportError, which a job treats as permanent (actors/errors.is_permanent): a rerun cannot fix it.
"""

from __future__ import annotations

import importlib.util
import logging

from .config import EngineConfig
from .models.registry import UnsupportedArchitecture

logger = logging.getLogger("modelyard.engine")

# Packages some transformers processors import only when built, with the families that need them:
# a missing one surfaces when the model loads, so `modelyard doctor` lists them up front.
PROCESSOR_PACKAGES = {
    "torchvision": "Qwen2-VL / Qwen2.5-VL, InternVL, LLaVA-OneVision, SmolVLM, Mistral 3 (Pixtral)",
    "num2words": "SmolVLM",
}
_KNOWN_PACKAGES = (*PROCESSOR_PACKAGES, "timm", "sentencepiece", "protobuf", "einops", "accelerate", "scipy")


class MissingPackage(ImportError):
    """A package the checkpoint's transformers classes need is not installed."""


def architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    return archs[0] if archs else type(hf_config).__name__


def transformers_loadable(hf_config) -> bool:
    """Whether AutoModelForImageTextToText has a class for this config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return type(hf_config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def check_transformers_loadable(hf_config) -> None:
    if transformers_loadable(hf_config):
        return
    import transformers

    raise UnsupportedArchitecture(
        f"architecture {architecture(hf_config)!r} (model_type {getattr(hf_config, 'model_type', None)!r}) runs on "
        f"neither backend: the native engine does not implement it and transformers {transformers.__version__} "
        f"cannot load it as image-text-to-text (AutoModelForImageTextToText has no class for "
        f"{type(hf_config).__name__})"
    )


def native_refusal(hf_config, config: EngineConfig) -> UnsupportedArchitecture | None:
    """Why the native engine would refuse this checkpoint, found by building it on the meta device
    (no memory, no weights), or None when it runs it."""
    import torch

    from .models.registry import get_model_class

    try:
        cls = get_model_class(hf_config)
        with torch.device("meta"):
            model = cls(hf_config)
        model.check_max_model_len(config.max_model_len or int(hf_config.text_config.max_position_embeddings))
    except UnsupportedArchitecture as e:
        return e
    return None


def choose_backend(path, config: EngineConfig) -> tuple[str, str | None]:
    """("native" | "transformers", why the native engine does not run it, or None)."""
    if config.backend != "auto":
        return config.backend, None
    from .loader import read_config

    hf_config = read_config(path)
    refusal = native_refusal(hf_config, config)
    if refusal is None:
        return "native", None
    check_transformers_loadable(hf_config)
    # The refusal's first clause says what is missing; the rest suggests the fallback taken here.
    reason = str(refusal).split("; ")[0]
    logger.warning("%s: %s runs on the transformers backend (%s)", path, architecture(hf_config), reason)
    return "transformers", reason


def missing_package(exc: ImportError, what: str) -> ImportError:
    """A one-line MissingPackage naming the package and its pip command, for an ImportError that
    names one; otherwise `exc` itself."""
    text = str(exc).lower()
    pkg = next((p for p in _KNOWN_PACKAGES if p in text), None)
    if pkg is None and getattr(exc, "name", None):
        pkg = exc.name.split(".")[0]
    if pkg is None:
        return exc
    pip = f"pip install {pkg}"
    if pkg == "torchvision":
        import torch

        pip += f" (the build that matches torch {torch.__version__})"
    return MissingPackage(f"{what} needs the Python package {pkg!r}, which is not installed: {pip}")


def missing_processor_packages() -> dict[str, str]:
    """{package: the families that need it} for the processor packages not installed here."""
    return {pkg: who for pkg, who in PROCESSOR_PACKAGES.items() if importlib.util.find_spec(pkg) is None}
