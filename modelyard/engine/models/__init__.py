"""Native model implementations, looked up by the HF architecture name (config.architectures[0])."""

from .base import NativeVLM
from .llava import merge_image_features
from .registry import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, get_model_class
from .weights import CheckpointMismatch

__all__ = [
    "NativeVLM",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedArchitecture",
    "get_model_class",
    "merge_image_features",
    "CheckpointMismatch",
]
