"""Checkpoint loading: the three formats users hold (original Wan, diffusers, Self-Forcing/MMPL ``.pt``) round
trip bit for bit with tiny weights written here, every bad file fails with a message that says what is wrong,
and loading goes through the meta device + ``assign`` (no second copy of the weights)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmpl_fast.loading as loading
from mmpl_fast.config import PRESETS, ModelConfig
from mmpl_fast.loading import CheckpointError, load_transformer, read_state_dict, save_transformer, wan_to_diffusers
from mmpl_fast.model import CausalWanModel

# Not a preset: a checkpoint with this geometry loads only through its config.json (or an explicit config).
CUSTOM = ModelConfig(name="custom", dim=64, num_heads=2, num_layers=1, ffn_dim=96, freq_dim=32, text_dim=48, text_len=8)


def random_state(config: str | ModelConfig = "tiny") -> dict[str, torch.Tensor]:
    """Every parameter moved off its initial value (norm weights, modulation tables and biases included)."""
    model = CausalWanModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return random_state("tiny")


def assert_same(model: CausalWanModel, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), f"{k} differs"
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a tensor was left on meta"


def msg(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------- writers
def write_wan_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """Original Wan layout: ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}}
    index["weight_map"] = weight_map
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_diffusers(root: Path, state: dict[str, torch.Tensor], config: ModelConfig) -> Path:
    """A pipeline-like folder: ``transformer/diffusion_pytorch_model.safetensors`` + a diffusers-style config."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    save_file(wan_to_diffusers(state), str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.42.0",
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": config.rope_max,
        "pos_embed_seq_len": None,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"model." + k: v for k, v in state.items()}


# ------------------------------------------------------------------------------------- round trips
def test_wan_sharded_round_trip(tmp_path, tiny):
    folder = write_wan_sharded(tmp_path / "Wan2.1-tiny", tiny)
    assert len(list(folder.glob("*.safetensors"))) == 3
    state, fmt = read_state_dict(folder)
    assert fmt == "wan" and set(state) == set(tiny)
    for config in (None, "tiny"):  # guessed from the preset shapes, and explicit
        model = load_transformer(folder, config)
        assert model.config.name == "tiny"
        assert_same(model, tiny)


def test_wan_single_file_round_trip(tmp_path, tiny):
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(tiny, str(file))
    for path in (file, tmp_path):  # the file itself, or its folder
        state, fmt = read_state_dict(path)
        assert fmt == "wan"
        assert_same(load_transformer(path), tiny)
    assert_same(load_transformer(file, "tiny", dtype=torch.float32), tiny)
    half = load_transformer(file, "tiny", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert all(torch.equal(half.state_dict()[k], v.to(torch.bfloat16)) for k, v in tiny.items())


def test_wan_config_json_is_honoured(tmp_path):
    state = random_state(CUSTOM)
    folder = write_wan_sharded(tmp_path / "wan", state, shards=2)
    with pytest.raises(CheckpointError, match="cannot infer num_heads: dim 64 is not a multiple of Wan2.1's head_dim"):
        load_transformer(folder)  # no config.json, not a preset, and 64 / 128 heads is no head count
    wan_cfg = {"_class_name": "WanModel", "model_type": "t2v", "dim": 64, "num_heads": 2, "num_layers": 1}
    wan_cfg |= {"ffn_dim": 96, "freq_dim": 32, "text_dim": 48, "text_len": 8, "in_dim": 16, "out_dim": 16}
    (folder / "config.json").write_text(json.dumps(wan_cfg))
    model = load_transformer(folder)
    assert model.config.replace(name="custom") == CUSTOM
    assert_same(model, state)
    assert_same(load_transformer(folder, CUSTOM), state)


def test_diffusers_round_trip(tmp_path, tiny):
    root = write_diffusers(tmp_path / "Wan2.1-T2V-tiny-Diffusers", tiny, PRESETS["tiny"])
    transformer = root / "transformer"
    for path in (root, transformer, transformer / "diffusion_pytorch_model.safetensors"):
        state, fmt = read_state_dict(path)
        assert fmt == "diffusers" and set(state) == set(tiny)
        model = load_transformer(path)  # geometry from config.json
        assert (model.config.dim, model.config.num_layers, model.config.ffn_dim) == (128, 2, 256)
        assert_same(model, tiny)
    assert_same(load_transformer(root, "tiny"), tiny)


def test_diffusers_config_json_is_honoured(tmp_path):
    state = random_state(CUSTOM)
    root = write_diffusers(tmp_path / "pipe", state, CUSTOM)
    model = load_transformer(root)
    cfg = model.config
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.freq_dim, cfg.text_dim) == (64, 2, 1, 96, 32, 48)
    assert_same(model, state)
    # a config.json that contradicts the weights is reported against it, not silently replaced by a guess
    raw = json.loads((root / "transformer" / "config.json").read_text())
    (root / "transformer" / "config.json").write_text(json.dumps({**raw, "ffn_dim": 100}))
    with pytest.raises(CheckpointError) as e:
        load_transformer(root)
    assert "blocks.0.ffn.0.weight" in msg(e) and "(96, 64)" in msg(e) and "(100, 64)" in msg(e)


def test_real_diffusers_save_pretrained_loads(tmp_path):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=24, freq_dim=32, ffn_dim=80, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=512,
    )  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    ref.save_pretrained(tmp_path / "transformer")
    model = load_transformer(tmp_path)  # no preset has this geometry: only config.json can describe it
    cfg = model.config
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.freq_dim, cfg.text_dim, cfg.rope_max) == (
        32, 2, 2, 80, 32, 24, 512,
    )  # fmt: skip
    assert read_state_dict(tmp_path)[1] == "diffusers"
    ours = wan_to_diffusers(model.state_dict())
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_save_transformer_is_read_by_diffusers_and_by_us(tmp_path, tiny):
    from diffusers import WanTransformer3DModel

    src = CausalWanModel("tiny")
    src.load_state_dict(tiny)
    out = save_transformer(src, tmp_path / "exported" / "transformer")
    # (from_pretrained needs `accelerate` for this class; from_config + the file is the same reading)
    back = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(out))
    back.load_state_dict(load_file(str(out / "diffusion_pytorch_model.safetensors")), strict=True)
    theirs = back.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in wan_to_diffusers(tiny).items())
    model = load_transformer(tmp_path / "exported")
    assert model.config.replace(name="tiny") == src.config  # text_len included: save_transformer writes it
    assert_same(model, tiny)


def test_self_forcing_pt_prefers_generator_ema(tmp_path, tiny):
    other = {k: v + 1 for k, v in tiny.items()}
    file = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(other), "generator_ema": prefixed(tiny), "step": torch.tensor(500)}, file)
    state, fmt = read_state_dict(file)
    assert fmt == "self_forcing" and set(state) == set(tiny)
    for config in (None, "tiny"):
        assert_same(load_transformer(file, config), tiny)


def test_self_forcing_pt_generator_only(tmp_path, tiny):
    file = tmp_path / "checkpoint_model_000100" / "model.pt"
    file.parent.mkdir()
    torch.save({"generator": prefixed(tiny)}, file)
    for path in (file, file.parent):
        state, fmt = read_state_dict(path)
        assert fmt == "self_forcing"
        assert_same(load_transformer(path), tiny)
    assert_same(load_transformer(file, "tiny"), tiny)


def test_legacy_torch_save_format_loads(tmp_path, tiny):
    file = tmp_path / "old.pth"
    torch.save({"generator_ema": prefixed(tiny)}, file, _use_new_zipfile_serialization=False)
    assert_same(load_transformer(file), tiny)


# ------------------------------------------------------------------------ meta device, assign, mmap
def test_loading_assigns_read_tensors_to_a_meta_model(tmp_path, tiny, monkeypatch):
    """No second copy: the model is built on meta and the tensors read from the file become its parameters."""
    file = tmp_path / "w.safetensors"
    save_file(tiny, str(file))
    reads, loads = [], []
    real_read, real_load_state_dict = loading.read_state_dict, torch.nn.Module.load_state_dict

    def spy_read(path):
        state, fmt = real_read(path)
        reads.append({k: v.data_ptr() for k, v in state.items()})
        return state, fmt

    def spy_load_state_dict(self, state_dict, *args, **kwargs):
        loads.append((kwargs.get("assign"), kwargs.get("strict"), all(p.is_meta for p in self.parameters())))
        return real_load_state_dict(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(loading, "read_state_dict", spy_read)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy_load_state_dict)
    model = load_transformer(file)
    assert loads == [(True, True, True)]
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert ptrs == reads[0]  # the very same storage: nothing was copied
    assert_same(model, tiny)


def test_torch_checkpoints_are_memory_mapped_and_weights_only(tmp_path, tiny, monkeypatch):
    file = tmp_path / "model.pt"
    torch.save({"generator_ema": prefixed(tiny)}, file)
    calls, ptrs, real_load = [], {}, torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        obj = real_load(*args, **kwargs)
        ptrs.update({k[len("model.") :]: v.data_ptr() for k, v in obj["generator_ema"].items()})
        return obj

    monkeypatch.setattr(torch, "load", spy_load)
    model = load_transformer(file)
    assert len(calls) == 1 and calls[0]["weights_only"] is True and calls[0]["mmap"] is True
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs  # the mapped tensors, not copies
    assert_same(model, tiny)


def test_wrong_preset_does_not_allocate_the_big_model(tmp_path, tiny, monkeypatch):
    """Tiny weights against the 1.3B preset: the shapes it expects come from a meta model, never a real one."""
    file = tmp_path / "tiny.safetensors"
    save_file(tiny, str(file))
    built = []

    class Spy(CausalWanModel):
        def __init__(self, config):
            super().__init__(config)
            built.append((self.config.name, self.patch_embedding.weight.device.type))

    monkeypatch.setattr(loading, "CausalWanModel", Spy)
    with pytest.raises(CheckpointError) as e:
        load_transformer(file, "wan2.1-t2v-1.3b")
    assert built and all(dev == "meta" for _, dev in built), built
    assert ("wan2.1-t2v-1.3b", "meta") in built
    m = msg(e)
    assert str(file) in m and "'wan2.1-t2v-1.3b' (dim 1536, 30 layers)" in m and "weights (dim 128, 2 layers)" in m
    assert "756 missing keys (blocks.10." in m  # blocks 2..29 are absent (28 x 27 keys)


# ------------------------------------------------------------------------------------ bad files
def test_missing_path(tmp_path):
    path = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {path}")):
        load_transformer(path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("weights go here")
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path)
    assert str(tmp_path) in msg(e) and "no weight files found" in msg(e)


def test_truncated_safetensors(tmp_path, tiny):
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(tiny, str(file))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_transformer(file)
    assert str(file) in msg(e) and "not a readable safetensors file (truncated or corrupt?)" in msg(e)


def test_truncated_pt(tmp_path, tiny):
    file = tmp_path / "model.pt"
    torch.save({"generator_ema": prefixed(tiny)}, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_transformer(file)
    assert str(file) in msg(e) and "not a readable torch checkpoint (truncated or corrupt?)" in msg(e)


def test_garbage_pt(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"this is not a checkpoint\n" * 40)
    with pytest.raises(CheckpointError) as e:
        load_transformer(file)
    assert str(file) in msg(e) and "not a readable torch checkpoint" in msg(e)


UNPICKLED: list[str] = []


class Payload:
    """A pickled object whose unpickling has a visible side effect (it must never run)."""

    def __setstate__(self, state):
        UNPICKLED.append("setstate")
        self.__dict__.update(state)


def _side_effect(marker: str) -> None:
    Path(marker).write_text("unpickled")


class ReducePayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


@pytest.mark.parametrize("kind", ["instance", "reduce"])
def test_pickled_object_is_refused_not_unpickled(tmp_path, tiny, kind):
    marker = tmp_path / "side_effect_ran"
    obj = Payload() if kind == "instance" else ReducePayload(str(marker))
    if kind == "instance":
        obj.x = 1
    file = tmp_path / "model.pt"
    torch.save({"generator_ema": prefixed(tiny), "config": obj}, file)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError) as e:
        load_transformer(file)
    assert str(file) in msg(e) and "refusing to unpickle" in msg(e)
    assert ("Payload" if kind == "instance" else "_side_effect") in msg(e)  # names what it refused
    assert UNPICKLED == [] and not marker.exists(), "the pickled object was executed"
    # control: an unrestricted unpickler would have run it (so the check above means something)
    torch.load(file, weights_only=False)
    assert (UNPICKLED == ["setstate"]) if kind == "instance" else marker.exists()


def test_pt_without_tensors(tmp_path):
    file = tmp_path / "model.pt"
    torch.save({"generator": {"model.a": 1.0, "model.b": "x"}}, file)
    with pytest.raises(CheckpointError, match=r"not a state dict: 2 entries are not tensors \(model.a, model.b\)"):
        read_state_dict(file)
    torch.save(torch.zeros(3), file)
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found Tensor"):
        read_state_dict(file)


def test_unknown_format_keys(tmp_path):
    file = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2), "decoder.conv_out.bias": torch.zeros(2)}, str(file))
    with pytest.raises(CheckpointError) as e:
        read_state_dict(file)
    assert str(file) in msg(e) and "unknown checkpoint format" in msg(e) and "decoder.conv_out.bias" in msg(e)


def test_unknown_format_file_type(tmp_path):
    file = tmp_path / "weights.txt"
    file.write_text("1 2 3")
    with pytest.raises(CheckpointError) as e:
        load_transformer(file)
    assert str(file) in msg(e) and "unknown checkpoint format" in msg(e) and ".safetensors" in msg(e)


def test_missing_keys(tmp_path, tiny):
    gone = ["blocks.1.ffn.2.bias", "blocks.0.norm3.weight", "head.modulation", "text_embedding.0.bias",
            "blocks.0.self_attn.norm_k.weight", "time_projection.1.weight", "patch_embedding.bias"]  # fmt: skip
    file = tmp_path / "w.safetensors"
    save_file({k: v for k, v in tiny.items() if k not in gone}, str(file))
    with pytest.raises(CheckpointError) as e:
        load_transformer(file, "tiny")
    m = msg(e)
    assert str(file) in m and "7 missing keys" in m and "unexpected" not in m
    shown = sorted(gone)[:5]
    assert ", ".join(shown) + ", ... (2 more)" in m
    # without a config the shapes give the tiny geometry with one head, which misses the same keys: said against
    # the preset of the same width
    with pytest.warns(UserWarning, match="head_dim 128"), pytest.raises(CheckpointError) as e:
        load_transformer(file)
    assert "no config.json beside the weights" in msg(e) and "against 'tiny'" in msg(e) and "7 missing keys" in msg(e)


def test_unexpected_keys(tmp_path, tiny):
    file = tmp_path / "w.safetensors"
    extra = {"blocks.0.self_attn.extra.weight": torch.zeros(3), "img_emb.proj.0.weight": torch.zeros(3)}
    save_file({**tiny, **extra}, str(file))
    with pytest.raises(CheckpointError) as e:
        load_transformer(file, "tiny")
    m = msg(e)
    assert str(file) in m and "2 unexpected keys (blocks.0.self_attn.extra.weight, img_emb.proj.0.weight)" in m
    assert "missing" not in m


def test_unexpected_diffusers_keys(tmp_path, tiny):
    root = write_diffusers(tmp_path / "pipe", tiny, PRESETS["tiny"])
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = wan_to_diffusers(tiny)
    state["condition_embedder.image_embedder.ff.net.0.proj.weight"] = torch.zeros(2)  # an image-to-video model
    save_file(state, str(file))
    with pytest.raises(CheckpointError) as e:
        load_transformer(root)
    assert "1 diffusers keys have no Wan equivalent: condition_embedder.image_embedder.ff.net.0.proj.weight" in msg(e)


def test_shape_mismatch(tmp_path, tiny):
    file = tmp_path / "w.safetensors"
    save_file({**tiny, "blocks.1.cross_attn.k.weight": torch.zeros(128, 64)}, str(file))
    with pytest.raises(CheckpointError) as e:
        load_transformer(file, "tiny")
    m = msg(e)
    assert str(file) in m and "'blocks.1.cross_attn.k.weight'" in m
    assert "has shape (128, 64)" in m and "expects (128, 128)" in m


def test_preset_that_does_not_match(tmp_path, tiny):
    file = tmp_path / "model.pt"
    torch.save({"generator_ema": prefixed(tiny)}, file)
    with pytest.raises(CheckpointError) as e:
        load_transformer(file, "wan2.1-t2v-14b")
    m = msg(e)
    assert (
        str(file) in m and "weights (dim 128, 2 layers) do not fit config 'wan2.1-t2v-14b' (dim 5120, 40 layers)" in m
    )
    # same key set, wrong width: the first differing shape is named
    with pytest.raises(CheckpointError) as e:
        load_transformer(file, CUSTOM.replace(num_layers=2))
    assert "'patch_embedding.weight' has shape (128, 16, 1, 2, 2)" in msg(e) and "expects (64, 16, 1, 2, 2)" in msg(e)


def test_missing_shard(tmp_path, tiny):
    folder = write_wan_sharded(tmp_path / "wan", tiny, shards=3)
    gone = folder / "diffusion_pytorch_model-00002-of-00003.safetensors"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_transformer(folder)
    assert "diffusion_pytorch_model.safetensors.index.json lists shards that are missing" in msg(e)
    assert str(gone) in msg(e) and "00001-of" not in msg(e)


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"metadata": {}}), "'weight_map'"),
        (json.dumps({"weight_map": ["a.safetensors"]}), "'weight_map' is a list"),
        (json.dumps({"weight_map": {}}), "'weight_map' is empty"),
    ],
)
def test_bad_index_json(tmp_path, tiny, text, why):
    folder = write_wan_sharded(tmp_path / "wan", tiny, shards=2)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError) as e:
        load_transformer(folder)
    assert str(index) in msg(e) and "not a valid shard index" in msg(e) and why in msg(e)


def test_bad_config_json(tmp_path, tiny):
    root = write_diffusers(tmp_path / "pipe", tiny, PRESETS["tiny"])
    cfg = root / "transformer" / "config.json"
    raw = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({k: v for k, v in raw.items() if k != "ffn_dim"}))
    assert load_transformer(root).config.ffn_dim == 256  # a field the config lacks comes from the shapes
    cfg.write_text(json.dumps({**raw, "attention_head_dim": 3}))  # odd head dim: ModelConfig refuses it
    with pytest.raises(CheckpointError, match=re.escape(f"{cfg}: missing or malformed field")):
        load_transformer(root)
    cfg.write_text(json.dumps({**raw, "qk_norm": None}))
    with pytest.raises(CheckpointError, match=re.escape(f"{cfg}: qk_norm=None is not supported")):
        load_transformer(root)
    cfg.write_text("{oops")
    with pytest.raises(CheckpointError, match=re.escape(f"{cfg}: not valid JSON")):
        load_transformer(root)
    assert_same(load_transformer(root, "tiny"), tiny)  # an explicit config does not read config.json


# ------------------------------------------------------------------------- configs without config.json
# Not a preset, and Wan2.1's head size: a bare original-Wan checkpoint of this geometry loads from its shapes alone.
WIDE = ModelConfig(name="wide", dim=256, num_heads=2, num_layers=3, ffn_dim=320, freq_dim=32, text_dim=24,
                   in_channels=20, out_channels=12)  # fmt: skip


@pytest.mark.parametrize("config", [PRESETS["tiny"], WIDE], ids=["preset", "not-a-preset"])
def test_original_wan_safetensors_without_config_load_from_their_shapes(tmp_path, config):
    torch.manual_seed(5)
    state = random_state(config)
    folder = write_wan_sharded(tmp_path / "Wan2.1-bare", state, shards=2)
    assert not (folder / "config.json").exists()
    if config.name == "tiny":
        model = load_transformer(folder)  # the one preset whose shapes match, with its 4 heads of 32
    else:
        with pytest.warns(UserWarning) as caught:
            model = load_transformer(folder)
        (line,) = [str(w.message) for w in caught if "head_dim" in str(w.message)]
        assert "\n" not in line and "Wan2.1's head_dim 128, 2 heads for dim 256" in line
    assert model.config.replace(name=config.name) == config
    assert_same(model, state)
    ref = CausalWanModel(config)
    ref.load_state_dict(state)
    x = torch.randn(1, 2, config.in_channels, 4, 4)
    assert torch.equal(_forward(model, x), _forward(ref, x))  # the same function, not only the same tensors


def _forward(model: CausalWanModel, x: torch.Tensor) -> torch.Tensor:
    from mmpl_fast.kv_pool import KVPool

    pool = KVPool.for_model(model, 2, model.config.tokens_per_frame(*x.shape[-2:]))
    cross = model.embed_context(torch.ones(1, 3, model.config.text_dim))
    with torch.no_grad():
        return model(x, torch.full((1, 2), 500.0), cross, pool.view([0, 1], [[0, 1]]))


# An original Wan config.json for WIDE (Wan2.1-T2V-1.3B's file has these fields).
WAN_CONFIG = dict(_class_name="WanModel", model_type="t2v", dim=256, num_heads=2, in_dim=20, out_dim=12, ffn_dim=320,
                  num_layers=3, freq_dim=32, text_dim=24, text_len=512, eps=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        {"num_heads": 2},  # original Wan naming, partial: the rest from the shapes
        WAN_CONFIG,
        {"num_attention_heads": 2, "attention_head_dim": 128, "in_channels": 20, "rope_max_seq_len": 1024},
        {"num_heads": 2, "in_channels": 20, "out_channels": 12},  # this package's names
    ],
    ids=["wan-partial", "wan-full", "diffusers", "ours"],
)
def test_config_dicts_and_files_in_any_naming(tmp_path, config):
    state = random_state(WIDE)
    file = tmp_path / "w.safetensors"
    save_file(state, str(file))
    model = load_transformer(file, config)
    assert model.config.replace(name="wide") == WIDE
    assert_same(model, state)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    for path in (tmp_path / "cfg.json", str(tmp_path / "cfg.json")):
        assert load_transformer(file, path).config.replace(name="wide") == WIDE


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"num_heads": 2, "heads": 2}, CheckpointError, "unknown config field 'heads'"),
        ({"num_heads": 2, "in_dim": 20, "in_channels": 20}, CheckpointError, "in_channels is given twice"),
        ({"num_heads": 2, "window_size": [4, 4]}, CheckpointError, re.escape("window_size=[4, 4] is not supported")),
        ({"num_heads": 3}, CheckpointError, "missing or malformed field"),  # 256 / 3 heads
        ({"num_heads": 2, "ffn_dim": 64}, CheckpointError, r"'blocks.0.ffn.0.weight' has shape \(320, 256\)"),
        ({"attention_head_dim": 128}, CheckpointError, "attention_head_dim without num_attention_heads"),
        ("no-such-preset", ValueError, "is neither a preset nor an existing file"),
        (3, TypeError, "config must be a preset name"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(tmp_path, config, error, match):
    file = tmp_path / "w.safetensors"
    save_file(random_state(WIDE), str(file))
    with pytest.raises(error, match=match):
        load_transformer(file, config)


def test_config_path_that_is_a_folder(tmp_path, tiny):
    file = tmp_path / "w.safetensors"
    save_file(tiny, str(file))
    with pytest.raises(ValueError, match="is a folder"):
        load_transformer(file, tmp_path)


def test_checkpoint_kind_and_sampling_come_with_the_transformer_not_the_components_folder(tmp_path, tiny):
    """The components folder was saved with its own model's kind and sampling (like the embedded model: UniPC,
    shift 3); a Self-Forcing .pt given as the transformer samples as Self-Forcing, and kind= still wins."""
    from mmpl_fast.pipeline import Pipeline

    comp = Pipeline.tiny(seed=0)
    comp.kind, comp.sampling = "world", {"shift": 3.0, "steps": 20}
    comp.save_pretrained(tmp_path / "components")
    torch.save({"generator_ema": prefixed(tiny)}, tmp_path / "sf.pt")
    sf = Pipeline.from_pretrained(tmp_path / "components", transformer=tmp_path / "sf.pt")
    assert (sf.kind, sf.sampling) == ("self_forcing", {})
    assert sf.facts().sampling == {"sampler": "few-step", "steps": 4, "shift": 5.0, "guidance": 1.0}
    mmpl = Pipeline.from_pretrained(tmp_path / "components", transformer=tmp_path / "sf.pt", kind="mmpl")
    assert mmpl.facts().sampling == {"sampler": "unipc", "steps": 50, "shift": 5.0, "guidance": 5.0}
    own = Pipeline.from_pretrained(tmp_path / "components")  # its own transformer keeps its kind and overrides
    assert (own.kind, own.facts().sampling["shift"], own.facts().sampling["steps"]) == ("world", 3.0, 20)
    torch.save({"generator_ema": prefixed(tiny)}, tmp_path / "components" / "sf.pt")  # even inside the folder
    inside = Pipeline.from_pretrained(tmp_path / "components", transformer=tmp_path / "components" / "sf.pt")
    assert (inside.kind, inside.sampling) == ("self_forcing", {})
    other = Pipeline.tiny(seed=1)  # a transformer from another pipeline folder brings that folder's kind
    other.kind = "causvid"
    other.save_pretrained(tmp_path / "other")
    for weights in (tmp_path / "other", tmp_path / "other" / "transformer"):
        assert Pipeline.from_pretrained(tmp_path / "components", transformer=weights).kind == "causvid"
