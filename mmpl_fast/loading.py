"""Checkpoint loading for the three formats users hold, detected automatically.

1. original Wan: ``diffusion_pytorch_model*.safetensors`` (sharded with an ``.index.json``), keys like
   ``blocks.0.self_attn.q.weight`` — the names this package uses;
2. diffusers: a ``transformer/`` folder (or its files), keys like ``blocks.0.attn1.to_q.weight``;
3. Self-Forcing / CausVid / MMPL ``.pt``: a dict with ``generator_ema`` (else ``generator``) whose keys
   start with ``model.``.

Only safetensors and ``torch.load(weights_only=True)`` are used: arbitrary pickles are refused. The model
is built on the meta device and the (memory-mapped) tensors are assigned to it, so a large model is
never held twice. Every error names the file, and where it applies the key and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .config import PRESETS, ModelConfig
from .model import CausalWanModel

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which file and why."""


# ------------------------------------------------------------------------------------------- key maps
# (ours = original Wan, diffusers) for keys under blocks.N. and for top-level keys.
_BLOCK_KEYS = [
    *[(f"self_attn.{a}.", f"attn1.{b}.") for a, b in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")]],
    *[(f"cross_attn.{a}.", f"attn2.{b}.") for a, b in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")]],
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("norm3.", "norm2."),  # Wan's affine cross-attention pre-norm is diffusers' norm2
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_TOP_KEYS = [
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
]


def _rename(key: str, to_diffusers: bool) -> str | None:
    src, dst = (0, 1) if to_diffusers else (1, 0)
    if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        for pair in _BLOCK_KEYS:
            if rest == pair[src] or (pair[src].endswith(".") and rest.startswith(pair[src])):
                return f"blocks.{idx}.{pair[dst]}{rest[len(pair[src]) :]}"
        return None
    for pair in _TOP_KEYS:
        if key == pair[src] or (pair[src].endswith(".") and key.startswith(pair[src])):
            return pair[dst] + key[len(pair[src]) :]
    return None


def diffusers_to_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers `WanTransformer3DModel` keys to this package's (original Wan) names."""
    out, unknown = {}, []
    for k, v in state.items():
        new = _rename(k, to_diffusers=False)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise CheckpointError(f"{len(unknown)} diffusers keys have no Wan equivalent: {_few(unknown)}")
    return out


def wan_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename this package's keys to diffusers' (for exporting, and for tests)."""
    out = {}
    for k, v in state.items():
        new = _rename(k, to_diffusers=True)
        if new is None:
            raise CheckpointError(f"key {k!r} has no diffusers equivalent")
        out[new] = v
    return out


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------ reading
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as e:  # permission denied, a folder, ...
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from e
    is_zip = magic == b"PK"  # torch.save's format since 1.6; memory-mappable
    if not is_zip and magic[:1] != b"\x80":  # nor a legacy (pre-1.6) pickle
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): neither torch.save's zip format "
            "nor a legacy pickle"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch raises many types for corrupt, truncated or pickled-object files
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        if found:  # the weights-only unpickler met a class or function: refused before anything ran
            raise CheckpointError(
                f"{path}: holds objects other than tensors ({found.group(1)}); refusing to unpickle it "
                "(only torch.load(weights_only=True) is used)"
            ) from e
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {first_line}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for name in ("generator_ema", "generator"):
        if name in obj:
            if not isinstance(obj[name], Mapping):
                raise CheckpointError(f"{path}: key {name!r} is not a state dict")
            obj = obj[name]
            break
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: not a state dict: {len(bad)} entries are not tensors ({_few(map(str, bad))}); "
            "a Self-Forcing/MMPL checkpoint holds 'generator_ema' or 'generator'"
        )
    return dict(obj)


def _weight_files(path: Path) -> list[Path]:
    """The weight files a path stands for (a file, a transformer folder, or a pipeline folder)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{path}: unknown checkpoint format (expected one of {', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    if (path / "transformer").is_dir():
        return _weight_files(path / "transformer")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}, not an object of file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index (expected a 'weight_map' object): {e}") from e
        if not weight_map:
            raise CheckpointError(f"{index}: not a valid shard index: 'weight_map' is empty")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(map(str, missing))}")
        return files
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise CheckpointError(f"{path}: no weight files found (expected *.safetensors or a Self-Forcing .pt)")
    return files


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint in any supported format; return (state dict with this package's key names, format).

    The format is one of ``"wan"``, ``"diffusers"``, ``"self_forcing"``.
    """
    path = Path(path)
    files = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_torch(f))
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    keys = list(state)
    if all(k.startswith("model.") for k in keys):
        state = {k[len("model.") :]: v for k, v in state.items()}
        fmt = "self_forcing"
    elif any(".attn1.to_q." in k for k in keys) or "proj_out.weight" in state:
        fmt = "diffusers"
        try:
            state = diffusers_to_wan(state)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    elif any(".self_attn.q." in k for k in keys) or "head.head.weight" in state:
        fmt = "wan"
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format: keys look like none of original Wan ('blocks.0.self_attn.q.weight'), "
            f"diffusers ('blocks.0.attn1.to_q.weight') or Self-Forcing ('model.…'); first keys: {_few(keys, 3)}"
        )
    return state, fmt


# ------------------------------------------------------------------------------------------- config
#: Wan2.1's head size: without a config, the head count is dim / 128.
WAN_HEAD_DIM = 128
#: Other names of `ModelConfig` fields: the original Wan ``config.json`` and diffusers' `WanTransformer3DModel`.
_ALIASES = {"in_dim": "in_channels", "out_dim": "out_channels", "num_attention_heads": "num_heads",
            "rope_max_seq_len": "rope_max"}  # fmt: skip
#: Fields of those configs that describe nothing this model varies: the only value it supports for each.
_FIXED = {"model_type": "t2v", "window_size": [-1, -1], "qk_norm": (True, "rms_norm_across_heads"),
          "cross_attn_norm": True, "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}  # fmt: skip
_FIELDS = {f for f in ModelConfig.__dataclass_fields__ if f != "name"}


def read_model_index(folder: str | os.PathLike) -> dict:
    """A pipeline folder's ``model_index.json`` ({} when there is none)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{index}: expected a JSON object, found {type(raw).__name__}")
    return raw


def checkpoint_index(weights: str | os.PathLike) -> dict:
    """The ``model_index.json`` of the pipeline folder that holds transformer `weights` (a pipeline folder, its
    ``transformer/`` folder or a file in it); {} for a loose checkpoint."""
    path = Path(weights)
    if path.is_dir() and (path / "model_index.json").is_file():
        return read_model_index(path)
    folder = path.parent if path.is_file() else path
    return read_model_index(folder.parent) if folder.name == "transformer" else {}


def infer_geometry(state: Mapping[str, torch.Tensor]) -> dict:
    """Everything the weights' shapes fix (this package's field names): dim, in/out channels, patch, layers,
    ffn, text_dim, freq_dim. The head count is not among them."""
    try:
        dim, cin, *patch = state["patch_embedding.weight"].shape
        out = dict(dim=dim, in_channels=cin, patch_size=tuple(patch))
        out["num_layers"] = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        out["ffn_dim"] = state["blocks.0.ffn.0.weight"].shape[0]
        out["text_dim"] = state["text_embedding.0.weight"].shape[1]
        out["freq_dim"] = state["time_embedding.0.weight"].shape[1]
        out["out_channels"] = state["head.head.weight"].shape[0] // math.prod(patch)
    except (KeyError, ValueError) as e:  # a key is missing, or a tensor has the wrong number of dimensions
        raise CheckpointError(f"cannot read the geometry from the weights: {e!r} is missing or malformed") from None
    return {k: int(v) if not isinstance(v, tuple) else tuple(int(x) for x in v) for k, v in out.items()}


def _heads(dim: int, where: str) -> int:
    if dim % WAN_HEAD_DIM:
        raise CheckpointError(f"{where}: cannot infer num_heads: dim {dim} is not a multiple of Wan2.1's head_dim "
                              f"{WAN_HEAD_DIM}; pass config={{'num_heads': N}}")  # fmt: skip
    heads = dim // WAN_HEAD_DIM
    warnings.warn(f"{where}: no head count given: assuming Wan2.1's head_dim {WAN_HEAD_DIM}, {heads} heads for dim "
                  f"{dim} (pass config= to override)", stacklevel=4)  # fmt: skip
    return heads


def _translate(raw: Mapping, where: str) -> dict:
    """A config in the original Wan, diffusers or this package's naming -> `ModelConfig` fields."""
    out: dict = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key.startswith("_") or key == "name":
            continue
        if key in _FIXED:
            allowed = _FIXED[key] if isinstance(_FIXED[key], tuple) else (_FIXED[key],)
            if (list(value) if isinstance(value, tuple) else value) not in allowed:
                raise CheckpointError(f"{where}: {key}={value!r} is not supported (only {allowed[0]!r})")
            continue
        if key == "attention_head_dim":
            continue  # with num_attention_heads below
        field = _ALIASES.get(key, key)
        if field not in _FIELDS:
            raise CheckpointError(f"{where}: unknown config field {key!r} (Wan, diffusers or ModelConfig names)")
        if field in out:
            raise CheckpointError(f"{where}: {field} is given twice (as {key!r} and another name)")
        out[field] = tuple(value) if field == "patch_size" and isinstance(value, list) else value
    if "attention_head_dim" in raw:
        if "num_heads" not in out:
            raise CheckpointError(f"{where}: attention_head_dim without num_attention_heads")
        head_dim = raw["attention_head_dim"]
        if "dim" in out and out["dim"] != out["num_heads"] * head_dim:
            raise CheckpointError(f"{where}: dim {out['dim']} != num_heads x attention_head_dim")
        out["dim"] = out["num_heads"] * head_dim
    return out


def config_from(raw: Mapping, state: Mapping[str, torch.Tensor], where: str, name: str) -> ModelConfig:
    """A `ModelConfig` from a (possibly partial) config dict in any naming; fields it lacks come from the
    weights' shapes, and the head count from Wan2.1's head_dim 128 (with a warning saying so)."""
    fields = {**infer_geometry(state), **_translate(raw, where)} if state else _translate(raw, where)
    if "num_heads" not in fields and "dim" in fields:
        fields["num_heads"] = _heads(fields["dim"], where)
    try:
        return ModelConfig(name=str(raw.get("name", name)), **fields)
    except (TypeError, ValueError) as e:  # a missing field (no weights to infer it from) or ModelConfig's checks
        raise CheckpointError(f"{where}: missing or malformed field {e}") from e


def _read_config_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def resolve_model_config(config, state: Mapping[str, torch.Tensor], path: Path) -> ModelConfig:
    """The checkpoint's `ModelConfig`, from `config` (a preset name, a `ModelConfig`, a dict, or a path to a
    config.json) or, without one, from the config.json beside the weights, else from the one preset whose shapes
    match, else from the weights' shapes (`config_from`)."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if isinstance(config, (str, os.PathLike)):
        file = Path(config)
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "is neither a preset nor an existing file"
            raise ValueError(f"config {str(config)!r} {what}; expected a preset ({', '.join(PRESETS)}), a "
                             "ModelConfig, a dict or a path to a config.json")  # fmt: skip
        return config_from(_read_config_json(file), state, str(file), file.parent.name)
    if isinstance(config, Mapping):
        return config_from(config, state, f"{path}: config", "custom")
    if config is not None:
        raise TypeError(f"config must be a preset name, ModelConfig, dict or config.json path, got {type(config)}")
    beside = _weight_files(path)[0].parent / "config.json"
    if beside.is_file():
        return config_from(_read_config_json(beside), state, str(beside), beside.parent.name)
    matches = [cfg for cfg in PRESETS.values() if _mismatch(state, cfg) is None]
    if len(matches) == 1:
        return matches[0]
    cfg = config_from({}, state, str(path), path.stem if path.is_file() else path.name)
    why = _mismatch(state, cfg)
    if why is not None:  # say what is wrong against the preset of the same width, if there is one
        closest = _closest_preset(state)
        why = f"against {closest.name!r}: {_mismatch(state, closest)}" if closest else why
        raise CheckpointError(f"{path}: no config.json beside the weights, and neither a preset nor the geometry "
                              f"their shapes give fits them (pass config=); {why}")  # fmt: skip
    return cfg


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CausalWanModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    """The geometry the weights show (for error messages)."""
    dim = state["patch_embedding.weight"].shape[0] if "patch_embedding.weight" in state else "?"
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return f"dim {dim}, {layers} layers"


def _mismatch(state: Mapping[str, torch.Tensor], config: ModelConfig) -> str | None:
    """Why the weights do not fit `config` (None if they do). Shapes come from a model on the meta device."""
    expected = _expected_shapes(config)
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    where = f"config {config.name!r} (dim {config.dim}, {config.num_layers} layers)"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        return f"weights ({_describe(state)}) do not fit {where}: " + "; ".join(parts)
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            return f"key {k!r} has shape {tuple(state[k].shape)}, {where} expects {shape}"
    return None


def _check_state(state: Mapping[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    why = _mismatch(state, config)
    if why:
        raise CheckpointError(f"{path}: {why}")


def _closest_preset(state: Mapping[str, torch.Tensor]) -> ModelConfig | None:
    """The preset of the weights' width (and depth, if several share it), or None."""
    dim = state["patch_embedding.weight"].shape[0] if "patch_embedding.weight" in state else None
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    same = [cfg for cfg in PRESETS.values() if cfg.dim == dim]
    if len(same) > 1:
        same = [cfg for cfg in same if cfg.num_layers == layers]
    return same[0] if len(same) == 1 else None


def load_transformer(
    path: str | os.PathLike,
    config: str | os.PathLike | ModelConfig | Mapping | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> CausalWanModel:
    """Load a causal Wan DiT from a checkpoint in any supported format (see `load_transformer_with_format`)."""
    return load_transformer_with_format(path, config, device=device, dtype=dtype)[0]


def load_transformer_with_format(
    path: str | os.PathLike,
    config: str | os.PathLike | ModelConfig | Mapping | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[CausalWanModel, str]:
    """Load a causal Wan DiT from a checkpoint in any supported format; also return the format
    (``"wan"``, ``"diffusers"`` or ``"self_forcing"``), read from the same pass over the file.

    Args:
        path: a weights file, a transformer folder, or a diffusers pipeline folder (``transformer/`` inside).
        config: a preset name, a `ModelConfig`, a dict or the path of a config.json, in the original Wan
            naming (``dim``, ``in_dim``, ``num_heads``, ...), diffusers' (``num_attention_heads``, ...) or
            `ModelConfig`'s; fields it lacks come from the weights' shapes. Default: ``config.json`` beside the
            weights, else the one preset whose shapes match, else the shapes alone (`resolve_model_config`).
        device, dtype: where and how to keep the weights (default dtype: as stored).
    """
    path = Path(path)
    state, fmt = read_state_dict(path)
    config = resolve_model_config(config, state, path)
    _check_state(state, config, path)
    with torch.device("meta"):
        model = CausalWanModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model now holds the only reference: a dtype/device move frees each read tensor as it goes
    return model.to(device=device, dtype=dtype).eval(), fmt


def save_transformer(model: CausalWanModel, folder: str | os.PathLike) -> Path:
    """Write a transformer as a diffusers-format folder (``config.json`` + safetensors) that diffusers' and
    this package's loaders both read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "rope_max_seq_len": cfg.rope_max,
        "text_len": cfg.text_len,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in wan_to_diffusers(model.state_dict()).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder
