"""The memory estimator (`scheduler.memory`) against real tensors, the pre-flight's ``loaded=``, and the memory plan
CLI (``python -m mmpl_fast.schedule --memory``)."""

from __future__ import annotations

import json

import pytest
import torch

from mmpl_fast.config import PRESETS
from mmpl_fast.kv_pool import KVPool
from mmpl_fast.model import CausalWanModel
from mmpl_fast.scheduler import (
    CostModel,
    Device,
    InsufficientMemoryError,
    Workload,
    build_dag,
    estimate_memory,
    memory_report,
    preflight,
)
from mmpl_fast.scheduler.memory import GIB, UMT5_XXL_PARAMETERS
from mmpl_fast.scheduler.simulate import main as cli_main


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["tiny", "embedded"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_estimate_matches_the_tensors_the_runtime_allocates(name, guidance):
    cfg = PRESETS[name]
    w = Workload(cfg, height=64, width=64, guidance=guidance, dtype="float32", vae_spatial=8)
    dag = build_dag("mmpl", 2)
    bd = estimate_memory(CostModel(w), dag)
    torch.manual_seed(0)
    model = CausalWanModel(cfg)
    assert bd.dit_weights == _bytes(model.parameters())
    tokens = w.tokens_per_frame
    pools = [KVPool(cfg, dag.layout.num_frames, tokens) for _ in range(w.branches)]  # what the pipeline allocates
    assert bd.kv_per_branch == _bytes([pools[0].k, pools[0].v])
    assert bd.kv_per_segment == sum(_bytes([p.k, p.v]) for p in pools)
    with torch.no_grad():  # one prompt's cross-attention cache per branch (conditional, unconditional)
        cross = [model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim)) for _ in range(w.branches)]
    assert bd.cross_cache == sum(_bytes(c.k + c.v) for c in cross)
    assert bd.branches == w.branches and bd.text_encoder == 0  # not counted unless asked


def test_estimate_matches_the_embedded_checkpoint_and_the_wan_vae():
    from pathlib import Path

    from safetensors.torch import load_file

    import mmpl_fast

    root = Path(mmpl_fast.__file__).parent / "assets" / "embedded" / "transformer"
    files = sorted(root.glob("*.safetensors"))
    assert files
    count = sum(t.numel() for f in files for t in load_file(str(f)).values())
    assert count == PRESETS["embedded"].num_parameters()
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()
    params = sum(p.numel() for p in vae.parameters())
    bd = estimate_memory(CostModel(Workload("wan2.1-t2v-1.3b")))
    assert bd.vae_weights / 2 == pytest.approx(params, rel=2e-3)  # Wan2.1's VAE, bf16


def test_wan_numbers_and_text_encoder():
    w = Workload("wan2.1-t2v-1.3b", guidance=5.0)
    bd = estimate_memory(CostModel(w), text_encoder=True)
    # DESIGN.md section 7: 287 MB of KV per latent frame and branch at 480x832 in bf16; 21 frames per segment
    assert bd.kv_per_branch == 21 * 2 * 30 * 1560 * 1536 * 2
    assert bd.kv_per_segment == 2 * bd.kv_per_branch
    assert bd.text_encoder == UMT5_XXL_PARAMETERS * 2  # umT5-XXL in bf16, about 11 GB
    assert estimate_memory(CostModel(w)).peak(1) == bd.peak(1) - bd.text_encoder
    assert bd.peak(2) > bd.peak(1) + bd.kv_per_segment  # a batch of two also holds two calls' workspace
    assert bd.largest_batch(bd.peak(2)) == 2 and bd.largest_batch(bd.peak(2) - 1) == 1
    with pytest.raises(ValueError, match="text_encoder_params"):
        estimate_memory(CostModel(Workload("tiny")), text_encoder=True)
    bd = estimate_memory(CostModel(Workload("tiny")), text_encoder=True, text_encoder_params=1000)
    assert bd.text_encoder == 2000


def test_readme_targets_come_from_the_estimator():
    small = memory_report("wan2.1-t2v-1.3b", 24, guidance=5.0, offload=True)
    assert small["fits"] and small["largest_batch_segments"] == 1
    assert not memory_report("wan2.1-t2v-1.3b", 24, guidance=5.0, offload=False)["fits"]  # umT5 does not fit too
    big = memory_report("wan2.1-t2v-14b", 80, guidance=5.0, offload=True)
    assert big["fits"] and 0 < big["margin_bytes"] < GIB  # fits 80 GiB, with well under 1 GiB to spare
    h100 = memory_report("wan2.1-t2v-14b", 81559 / 1024, guidance=5.0, offload=True)  # an H100's 81,559 MiB
    assert not h100["fits"] and -GIB < h100["margin_bytes"] < 0


def test_preflight_counts_loaded_weights_once():
    dag = build_dag("mmpl", 4)
    costs = CostModel(Workload("wan2.1-t2v-1.3b"))
    bd = estimate_memory(costs, dag)
    free = bd.fixed + 2 * bd.kv_per_segment - 1  # room for one segment when nothing is loaded yet
    before = preflight(dag, costs, [Device("cuda:0", memory_bytes=free)])
    assert before.capacity == (1,)
    # the same reading taken after loading the weights: they are inside it already, not needed again
    after = preflight(dag, costs, [Device("cuda:0", memory_bytes=free)], loaded=("weights",))
    weights = bd.dit_weights + bd.vae_weights
    assert after.capacity[0] == (free - (bd.fixed - weights)) // bd.kv_per_segment >= 1
    # per device: weights loaded on the first device only (replicas are made later)
    per = preflight(dag, costs, [Device("cuda:0", memory_bytes=free), Device("cuda:1", memory_bytes=free)],
                    loaded=[{"dit", "vae"}, ()])  # fmt: skip
    assert per.capacity == (after.capacity[0], 1)
    assert before.workspace[0] == free - bd.fixed - bd.kv_per_segment + max(bd.activations, bd.vae_workspace)
    with pytest.raises(ValueError, match="loaded"):
        preflight(dag, costs, [Device("cuda:0", memory_bytes=free)], loaded=("optimizer",))
    with pytest.raises(ValueError, match="one collection of parts per device"):
        preflight(dag, costs, [Device("cuda:0", memory_bytes=free)], loaded=[(), ()])


def test_preflight_refusal_suggests_offloading_the_text_encoder():
    dag = build_dag("mmpl", 2)
    costs = CostModel(Workload("wan2.1-t2v-1.3b", guidance=5.0))
    with pytest.raises(InsufficientMemoryError, match="text encoder offloaded"):
        preflight(dag, costs, [Device("cuda:0", memory_bytes=int(23.5 * GIB))], text_encoder=True)
    assert preflight(dag, costs, [Device("cuda:0", memory_bytes=int(23.5 * GIB))]).capacity == (1,)


def test_memory_cli_text_and_json(capsys):
    argv = ["--memory", "--preset", "wan2.1-t2v-1.3b", "--device-memory", "24", "--guidance", "5", "--offload"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("DiT weights", "text encoder", "VAE weights", "KV per segment per branch", "activations", "peak"):
        assert needle in out
    assert cli_main([*argv, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["largest_batch_segments"] == 1 and m["fits"] and m["dtype"] == "bfloat16" and m["text_encoder"] == 0
    assert m["kv_per_segment"] == 2 * m["kv_per_branch"]
    assert cli_main([*argv[:-1], "--json", "--dtype", "fp32"]) == 0
    m32 = json.loads(capsys.readouterr().out)
    assert m32["dtype"] == "float32" and m32["dit_weights"] == 2 * m["dit_weights"] and not m32["fits"]
    assert cli_main(["--memory", "--device-memory", "-1"]) == 2
    assert "device_memory" in capsys.readouterr().err
