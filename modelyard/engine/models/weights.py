"""Checkpoint tensor names -> native parameters, for every layout LLaVA checkpoints come in.

Layouts seen in the wild (all map to one canonical form, the native module names):
  transformers-5 state dict:  model.language_model.layers.N...  model.vision_tower.embeddings...
                              model.multi_modal_projector...    lm_head.weight
  transformers save / Hub:    language_model.model.layers.N...  language_model.lm_head.weight
                              vision_tower.vision_model.embeddings...  (older Hub, e.g. llava-1.5-7b-hf)
                              vision_tower.embeddings...               (transformers >= 5 save_pretrained)
                              multi_modal_projector...
Separate q/k/v and gate/up tensors land in their rows of the merged parameters (see MergedLinear).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .layers import MergedLinear

_RENAMES = (
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
)


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def canonical_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def weight_targets(model: nn.Module) -> dict[str, tuple[nn.Parameter, int | None, int | None]]:
    """canonical checkpoint name -> (parameter, row offset, rows); offset None means the whole tensor."""
    targets: dict[str, tuple[nn.Parameter, int | None, int | None]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = list(module.named_parameters(recurse=False))
        if isinstance(module, MergedLinear):
            parent = mod_name.rsplit(".", 1)[0] + "." if "." in mod_name else ""
            for part, (offset, rows) in module.parts.items():
                for pname, param in own:
                    targets[f"{parent}{part}.{pname}"] = (param, offset, rows)
        else:
            for pname, param in own:
                targets[prefix + pname] = (param, None, None)
    return targets


def _some(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_named_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], ignored: Callable[[str], bool]
) -> set[str]:
    """Copy each (checkpoint name, tensor) into its parameter (casting to the parameter's dtype and device).

    `ignored(canonical_name)` marks checkpoint tensors the model deliberately does not use.
    Raises CheckpointMismatch listing unexpected and missing names; returns the canonical names loaded.
    """
    targets = weight_targets(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        key = canonical_name(name)
        target = targets.get(key)
        if target is None:
            if not ignored(key):
                unexpected.append(name)
            continue
        param, offset, rows = target
        dst = param.data if offset is None else param.data.narrow(0, offset, rows)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointMismatch(
                f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                f"model expects {tuple(dst.shape)} (config.json and weights disagree)"
            )
        dst.copy_(tensor)
        loaded.add(key)
    missing = set(targets) - loaded
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameters missing from the checkpoint: {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected checkpoint tensors: {_some(unexpected)}")
        raise CheckpointMismatch("checkpoint does not match the model built from its config: " + "; ".join(parts))
    return loaded
