"""Save and load models as a folder of ``config.json`` + ``model.safetensors`` (or, for a large
model, safetensors shards and their ``model.safetensors.index.json``, as transformers writes them).

One mixin for every model EvoTok ships (tokenizer, teacher, multimodal model) so that they all
load the same way from a local folder or a Hugging Face Hub id, never unpickle anything, write
atomically, and fail with a message that says what is wrong with a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # the shards' weight map (a sharded checkpoint)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


def weights_digest(module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """sha256 of a module's state dict (names and fp32 values): identifies the exact checkpoint,
    whatever folder or dtype it was loaded from. With ``prefixes``, only the entries whose names
    start with one of them (a part of the model, e.g. what a teacher's patch features depend on)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
                      .contiguous().numpy().tobytes())
    return digest.hexdigest()


def resolve_checkpoint(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is, otherwise a Hugging Face Hub id fetched with ``snapshot_download``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), **hub_kwargs))
    except Exception as err:  # the hub client raises many types; all mean "not obtainable"
        raise CheckpointError(
            f"cannot find checkpoint {str(name_or_path)!r}: it is not a local folder and the Hub "
            f"lookup failed ({type(err).__name__}: {err}). Offline (HF_HUB_OFFLINE=1) only cached ids work."
        ) from err


def atomic_write_dir(final: Path, write: Any) -> None:
    """Call ``write(tmp_dir)`` then move the folder into place, so a killed save loses nothing."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        backup = None
        if final.exists():
            backup = final.with_name(f".{final.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            final.rename(backup)
        tmp.rename(final)
        if backup is not None:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def config_from_dict(config_cls: type, data: dict) -> Any:
    """Build a dataclass config, naming unknown keys instead of failing with a TypeError."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names - {"model_type", "evotok_version"})
    if unknown:
        raise CheckpointError(f"config has keys {unknown} that {config_cls.__name__} does not know")
    kwargs = {k: v for k, v in data.items() if k in names}
    for f in dataclasses.fields(config_cls):  # JSON turns tuples into lists
        if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
            kwargs[f.name] = tuple(kwargs[f.name])
    return config_cls(**kwargs)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from a dataclass config.

    Subclasses set ``config_class`` and ``model_type`` and take ``config`` as their only
    required constructor argument. Extra files (a text tokenizer, a model card) are written by
    overriding ``_save_extra(folder)`` and read back in ``_load_extra(folder)``.
    """

    config_class: ClassVar[type]
    model_type: ClassVar[str]

    def save_pretrained(self, folder: str | os.PathLike, max_shard_size: int | str | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """Write ``folder`` atomically. ``max_shard_size`` (bytes, or text such as ``"5GB"``): split
        the weights into safetensors shards of at most that size, with an index, when they are
        larger. ``dtype``: store floating-point weights in it (``torch.bfloat16`` halves the
        files); loading casts them back to the model's own dtype."""
        folder = Path(folder)

        def write(tmp: Path) -> None:
            config = {"model_type": self.model_type, **config_to_dict(self.config)}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            state = _dedupe_shared({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()})
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            write_weights(state, tmp, max_shard_size)
            self._save_extra(tmp)

        atomic_write_dir(folder, write)
        return folder

    @classmethod
    def load_config(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Any:
        folder = resolve_checkpoint(name_or_path, **hub_kwargs)
        return cls._read_config(folder)

    @classmethod
    def _read_config(cls, folder: Path) -> Any:
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(f"{folder} has no {CONFIG_NAME}; is it an EvoTok checkpoint folder?")
        try:
            data = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_file} is not valid JSON ({err})") from err
        found = data.get("model_type")
        if found is not None and found != cls.model_type:
            raise CheckpointError(f"{folder} holds a {found!r} checkpoint, not a {cls.model_type!r} one")
        return config_from_dict(cls.config_class, data)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        **hub_kwargs: Any):
        folder = resolve_checkpoint(name_or_path, **hub_kwargs)
        config = cls._read_config(folder)
        model = cls(config)
        state, source = read_weights(folder, map_location)
        load_state_strict(model, state, source=source)
        model._load_extra(folder)
        model.eval()
        return model

    def _save_extra(self, folder: Path) -> None:
        """Hook for subclasses: write files beside the weights."""

    def _load_extra(self, folder: Path) -> None:
        """Hook for subclasses: read files written by ``_save_extra``."""


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str | None = None) -> None:
    """``model.safetensors``, or shards named and indexed as transformers names them when the
    weights exceed ``max_shard_size`` (split by ``huggingface_hub``)."""
    if max_shard_size is not None:
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        if split.is_sharded:
            for filename, names in split.filename_to_tensors.items():
                save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
            index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
            return
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def read_weights(folder: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a checkpoint folder, one file or shards, and where it came from (for errors)."""
    single, index_file = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return _load_safetensors(single, map_location), str(single)
    if not index_file.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (nor the {INDEX_NAME} of a sharded checkpoint)")
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file} is not a valid shard index ({type(err).__name__}: {err})") from err
    state: dict[str, torch.Tensor] = {}
    for filename in sorted(set(weight_map.values())):
        shard = folder / filename
        if Path(filename).name != filename or not shard.is_file():
            raise CheckpointError(f"{index_file} names the shard {filename!r}, which is not in {folder}")
        tensors = _load_safetensors(shard, map_location)
        expected = {name for name, f in weight_map.items() if f == filename}
        if set(tensors) != expected:
            raise CheckpointError(f"{shard} does not hold the tensors {index_file.name} maps to it "
                                  f"(missing {sorted(expected - set(tensors))[:4]}, "
                                  f"extra {sorted(set(tensors) - expected)[:4]})")
        state.update(tensors)
    return state, str(index_file)


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({err})") from err


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor, with one readable error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    state = _restore_shared(own, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        lines = [f"checkpoint {source} does not match {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): keep the first name only."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = tensor
    return out


def _restore_shared(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill in tied weights dropped by ``_dedupe_shared`` from the tensor they share storage with."""
    state = dict(state)
    by_ptr: dict[int, list[str]] = {}
    for name, tensor in own.items():
        if tensor.numel():
            by_ptr.setdefault(tensor.data_ptr(), []).append(name)
    for names in by_ptr.values():
        present = [n for n in names if n in state]
        if present:
            for n in names:
                state.setdefault(n, state[present[0]])
    return state
