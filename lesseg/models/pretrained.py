"""Load local pretrained weights into a timm `features_only` encoder without executing code from the file.

Accepts torchvision- and timm-style checkpoints (for ResNets the names agree; the `fc.` classifier is simply
not used), plain or wrapped in a `state_dict`/`model` entry, with `module.`/`backbone.`/`encoder.` prefixes,
and lesseg's own training checkpoints (the encoder of the network they evaluate: pretrain on one dataset,
e.g. a synthetic domain, then train on another).
timm's feature wrapper renames first-level Sequential children (`stages.0.x` becomes `stages_0.x`); names
are matched through that renaming.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import Tensor, nn

from lesseg.errors import ConfigError
from lesseg.safe_load import torch_load

logger = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict", "model")
PREFIXES = ("module.", "backbone.", "encoder.")
SHOWN_KEYS = 5  # how many key names a message lists


class LoadReport(NamedTuple):
    """What a checkpoint load did, by encoder / checkpoint key name."""

    loaded: list[str]  # encoder keys set from the checkpoint
    missing: list[str]  # encoder keys absent from the checkpoint: they keep their initial values
    unexpected: list[str]  # checkpoint keys the encoder has no use for


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike[str], partial: bool = False) -> LoadReport:
    """Copy the tensors of the checkpoint at `path` into `encoder` and say how many it took.

    Raises ConfigError if the file is missing or unreadable, if no key matches, if a shape differs, or, unless
    ``partial``, if the checkpoint is not of this encoder (encoder tensors it lacks, or encoder-like tensors
    the encoder has no place for: a resnet18 file for a resnet34); with ``partial`` those are warnings.
    """
    path = Path(path)
    state = _select_prefix(_unwrap(_read(path), path))
    target = encoder.state_dict()
    matched: dict[str, Tensor] = {}
    used: set[str] = set()
    mismatched: list[str] = []
    for key, value in target.items():
        source = next((name for name in _checkpoint_names(key) if name in state), None)
        if source is None:
            continue
        used.add(source)
        if state[source].shape != value.shape:
            mismatched.append(
                f"{key} (checkpoint {tuple(state[source].shape)}, encoder {tuple(value.shape)})"
            )
        matched[key] = state[source]
    if mismatched:
        raise ConfigError(f"pretrained checkpoint {path}: shape mismatch for {_listing(mismatched)}")
    if not matched:
        raise ConfigError(
            f"pretrained checkpoint {path}: no key matches the encoder; checkpoint has "
            f"{_listing(list(state))}, encoder expects {_listing(list(target))}"
        )
    # old checkpoints lack BatchNorm's step counter, which has no effect with a fixed momentum
    missing = [k for k in target if k not in matched and not k.endswith("num_batches_tracked")]
    dropped = _dropped_by_features_only(encoder)
    unexpected = [k for k in state if k not in used and k not in dropped]
    took = f"{len(matched)} of the encoder's {len(target)} tensors"
    if (missing or unexpected) and not partial:
        parts = ([f"it lacks encoder {_listing(missing)}"] if missing else []) + (
            [f"it has {_listing(unexpected)} that the encoder has no place for"] if unexpected else [])
        raise ConfigError(
            f"pretrained checkpoint {path} is not a checkpoint of this encoder ({encoder_name(encoder)}): it "
            f"provides {took}; {'; '.join(parts)}. Set model.pretrained_partial=true to load what matches"
        )
    encoder.load_state_dict(matched, strict=False)
    logger.info("loaded %s from %s", took, path)
    if missing:
        logger.warning("pretrained checkpoint %s (partial load, %s) lacks encoder %s", path, took, _listing(missing))
    if unexpected:
        logger.warning("pretrained checkpoint %s (partial load, %s) has unused %s", path, took, _listing(unexpected))
    return LoadReport(list(matched), missing, unexpected)


def encoder_name(encoder: nn.Module) -> str:
    """The timm architecture of an encoder, for messages."""
    return getattr(encoder, "pretrained_cfg", {}).get("architecture") or type(encoder).__name__


def _read(path: Path) -> Any:
    """Deserialize tensors only: `weights_only=True` refuses pickled code, safetensors holds none."""
    if path.suffix != ".safetensors":
        return torch_load(path, "cpu", "pretrained checkpoint", ConfigError)
    if not path.is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ConfigError(f"reading {path} needs the 'safetensors' package, which is not installed") from e
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001  (a corrupt file fails in many ways; the user needs one message)
        raise ConfigError(f"cannot load pretrained checkpoint {path}: {str(e).splitlines()[0]}") from None


def eval_net_weights(state: Mapping) -> dict[str, Tensor]:
    """The weights of the network a lesseg training checkpoint evaluates (the method attribute it names in
    ``eval_net``: ``net``, ``teacher``, ...), keyed as that network's own state dict."""
    prefix = state["eval_net"] + "."
    return {k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)}


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """Descend into `state_dict`/`model` containers and keep the tensor entries; of a lesseg training
    checkpoint, the weights of the network it evaluates (e.g. the EMA teacher)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("method"), Mapping) and "config" in obj:
        name = obj.get("eval_net")
        if not isinstance(name, str):
            raise ConfigError(
                f"pretrained checkpoint {path} is a lesseg checkpoint from before checkpoints named their "
                "evaluated network; extract its encoder weights into a file of their own"
            )
        obj = eval_net_weights(obj)
    while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in CONTAINER_KEYS):
        obj = next(obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping))
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, Mapping) else {}
    if not state:
        raise ConfigError(f"pretrained checkpoint {path} holds no state dict of tensors")
    return state


def _select_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes; keys outside a `backbone.`/`encoder.` part (decoders) are left out."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _checkpoint_names(key: str) -> Iterator[str]:
    """Names an encoder key can have in a checkpoint: itself, or with a flattened `a_b.` prefix as `a.b.`."""
    yield key
    head, dot, rest = key.partition(".")
    for i, char in enumerate(head):
        if char == "_":
            yield f"{head[:i]}.{head[i + 1 :]}{dot}{rest}"


def _dropped_by_features_only(encoder: nn.Module) -> set[str]:
    """Keys of the full timm model that `features_only` removes (classifier, final conv): expected extras.

    The full model is built on the meta device, so this allocates no weights.
    """
    arch = getattr(encoder, "pretrained_cfg", {}).get("architecture")
    if arch is None or not timm.is_model(arch):
        return set()
    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    kept = {name for key in encoder.state_dict() for name in _checkpoint_names(key)}
    return set(full.state_dict()) - kept


def _listing(keys: list[str]) -> str:
    """'3 keys: a, b, c' with at most SHOWN_KEYS names."""
    more = ", ..." if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}: {', '.join(keys[:SHOWN_KEYS])}{more}"
