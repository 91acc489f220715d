"""The causal Wan DiT against diffusers' WanTransformer3DModel (the numerical oracle), and its KV pool."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from mmpl_fast.config import PRESETS, ModelConfig
from mmpl_fast.kv_pool import KVPool, memory_bytes
from mmpl_fast.loading import diffusers_to_wan
from mmpl_fast.model import CausalWanModel

# (heads, head_dim, layers, frames, latent H, latent W, text_len)
CONFIGS = [
    (2, 16, 2, 3, 4, 6, 7),
    (3, 12, 1, 5, 6, 4, 5),
    (4, 32, 2, 2, 4, 4, 9),
    (1, 24, 3, 7, 2, 8, 3),
]


class Float64Sinusoid(torch.nn.Module):
    """Wan2.1's time sinusoid ([cos, sin], float64). diffusers computes it in float32, which alone moves
    the output by ~1e-5 at t ~ 1000; the oracle gets the original model's precision for this one piece."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        ang = t.double()[:, None] * freqs[None]
        return torch.cat([ang.cos(), ang.sin()], dim=1).float()


def make_pair(heads, head_dim, layers, text_len, in_ch=4):
    """A random diffusers model and our model with the same weights (via the key map)."""
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_ch,
        out_channels=in_ch, text_dim=24, freq_dim=32, ffn_dim=3 * heads * head_dim, num_layers=layers,
        cross_attn_norm=True, eps=1e-6,
    ).eval()  # fmt: skip
    with torch.no_grad():  # move every weight (norms and tables included) off its default
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.condition_embedder.timesteps_proj = Float64Sinusoid(32)
    cfg = ModelConfig(
        name="test", dim=heads * head_dim, num_heads=heads, num_layers=layers, ffn_dim=3 * heads * head_dim,
        freq_dim=32, text_dim=24, text_len=text_len, in_channels=in_ch, out_channels=in_ch,
    )  # fmt: skip
    ours = CausalWanModel(cfg).eval()
    ours.load_state_dict(diffusers_to_wan(ref.state_dict()), strict=True)
    return ref, ours, cfg


def full_view(cfg, frames, h, w, batch=1):
    pool = KVPool(cfg, frames * batch, cfg.tokens_per_frame(h, w))
    pages = [list(range(b * frames, (b + 1) * frames)) for b in range(batch)]
    return pool.view(range(frames), pages)


@pytest.mark.parametrize("heads,head_dim,layers,frames,h,w,text_len", CONFIGS)
def test_parity_with_diffusers_bidirectional(heads, head_dim, layers, frames, h, w, text_len):
    ref, ours, cfg = make_pair(heads, head_dim, layers, text_len)
    batch = 2
    x = torch.randn(batch, 4, frames, h, w)
    ctx = torch.randn(batch, text_len, 24)
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x.transpose(1, 2), t, ours.embed_context(ctx), full_view(cfg, frames, h, w, batch))
    assert (got.transpose(1, 2) - want).abs().max().item() <= 1e-5


def test_parity_per_frame_timesteps():
    """Timesteps are per latent frame: compare with diffusers' per-token timesteps."""
    ref, ours, cfg = make_pair(2, 16, 2, 6)
    frames, h, w = 4, 4, 6
    x = torch.randn(1, 4, frames, h, w)
    ctx = torch.randn(1, 6, 24)
    t_frames = torch.tensor([[0.0, 625.0, 833.3, 1000.0]])
    t_tokens = t_frames.repeat_interleave(cfg.tokens_per_frame(h, w), dim=1)
    with torch.no_grad():
        want = ref(x, t_tokens, ctx, return_dict=False)[0]
        got = ours(x.transpose(1, 2), t_frames, ours.embed_context(ctx), full_view(cfg, frames, h, w))
    assert (got.transpose(1, 2) - want).abs().max().item() <= 1e-5


class MaskedProcessor(WanAttnProcessor):
    """diffusers' Wan attention with a fixed boolean self-attention mask (True = may attend)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


class PositionRope(torch.nn.Module):
    """diffusers' Wan RoPE, but at given frame positions (teacher forcing gives a clean frame and its noisy
    copy the same temporal position)."""

    def __init__(self, rope, frame_pos):
        super().__init__()
        self.rope, self.pos = rope, torch.as_tensor(frame_pos)

    def forward(self, hidden_states):
        _, _, f, hh, ww = hidden_states.shape
        p_t, p_h, p_w = self.rope.patch_size
        gh, gw = hh // p_h, ww // p_w
        sizes = [self.rope.t_dim, self.rope.h_dim, self.rope.w_dim]
        out = []
        for table in (self.rope.freqs_cos, self.rope.freqs_sin):
            t_part, h_part, w_part = table.split(sizes, dim=1)
            parts = [
                t_part[self.pos].view(f, 1, 1, -1).expand(f, gh, gw, -1),
                h_part[:gh].view(1, gh, 1, -1).expand(f, gh, gw, -1),
                w_part[:gw].view(1, 1, gw, -1).expand(f, gh, gw, -1),
            ]
            out.append(torch.cat(parts, dim=-1).reshape(1, f * gh * gw, 1, -1))
        return tuple(out)


# Layouts written out here, independently of mmpl_fast.layouts: (frames, frames read besides itself).
MMPL_STAGES = [
    ([0, 1], []),
    ([2, 3, 10, 11, 12, 19, 20], [0, 1]),
    (list(range(4, 10)), [0, 1, 2, 3, 10, 11, 12]),
    (list(range(13, 19)), list(range(0, 13)) + [19, 20]),
]


def ar_stages(n, block):
    return [(list(range(i, i + block)), list(range(i))) for i in range(0, n, block)]


@pytest.mark.parametrize(
    "name,stages,n",
    [("ar1", ar_stages(6, 1), 6), ("ar3", ar_stages(9, 3), 9), ("mmpl", MMPL_STAGES, 21)],
)
def test_stage_rollout_equals_masked_full_forward(name, stages, n):
    ref, ours, cfg = make_pair(2, 16, 2, 5)
    h, w = 2, 4
    tokens = cfg.tokens_per_frame(h, w)
    x = torch.randn(1, 4, n, h, w)
    ctx = torch.randn(1, 5, 24)
    t_frame = torch.empty(n)
    for k, (frames, _) in enumerate(stages):  # a different timestep per stage, as during generation
        t_frame[frames] = 1000.0 - 97.0 * k

    # The oracle: one diffusers forward over all frames with the token mask of the layout.
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for frames, reads in stages:
        for f in frames:
            allowed[f, frames + reads] = True
    mask = allowed.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    for blk in ref.blocks:
        blk.attn1.set_processor(MaskedProcessor(mask))
    with torch.no_grad():
        want = ref(x, t_frame.repeat_interleave(tokens)[None], ctx, return_dict=False)[0].transpose(1, 2)

    # Ours: stage by stage through the pool; frame f lives in a page chosen out of order on purpose.
    pool = KVPool(cfg, n + 3, tokens)
    page_of = {f: p for f, p in zip(range(n), reversed(pool.allocate(n + 3)))}
    cross = ours.embed_context(ctx)
    got = torch.empty_like(want)
    with torch.no_grad():
        for frames, reads in stages:
            view = pool.view(frames, [[page_of[f] for f in frames]], [[page_of[f] for f in reads]])
            xs = x.transpose(1, 2)[:, frames]
            got[:, frames] = ours(xs, t_frame[frames][None], cross, view)
    assert (got - want).abs().max().item() <= 1e-5


def test_rope_positions_beyond_table_raise():
    cfg = PRESETS["tiny"].replace(rope_max=16)
    model = CausalWanModel(cfg)
    pool = KVPool(cfg, 2, cfg.tokens_per_frame(2, 2))
    cross = model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim))
    x = torch.randn(1, 1, cfg.in_channels, 2, 2)
    model(x, torch.zeros(1, 1), cross, pool.view([15], [[0]]))  # last position is fine
    with pytest.raises(ValueError, match="RoPE positions out of range"):
        model(x, torch.zeros(1, 1), cross, pool.view([16], [[1]]))


def test_forward_rejects_bad_inputs():
    cfg = PRESETS["tiny"]
    model = CausalWanModel(cfg)
    pool = KVPool(cfg, 4, cfg.tokens_per_frame(4, 4))
    cross = model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim))
    x = torch.randn(1, 2, cfg.in_channels, 4, 4)
    view = pool.view([0, 1], [[0, 1]])
    with pytest.raises(ValueError, match="x: expected"):
        model(x[:, :, :3], torch.zeros(1, 2), cross, view)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.zeros(1, 3), cross, view)
    with pytest.raises(ValueError, match="view"):
        model(x, torch.zeros(1, 2), cross, pool.view([0], [[2]]))
    with pytest.raises(ValueError, match="pool pages hold"):
        model(torch.randn(1, 2, cfg.in_channels, 4, 6), torch.zeros(1, 2), cross, view)
    with pytest.raises(ValueError, match="text_states"):
        model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim + 1))


def test_pool_allocation_and_views():
    cfg = PRESETS["tiny"]
    pool = KVPool(cfg, 4, 8)
    assert pool.allocate(3) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="1 free of 4"):
        pool.allocate(2)
    pool.release([1])
    assert pool.allocate(1) == [1]
    with pytest.raises(ValueError, match="not allocated"):
        pool.release([3])
    view = pool.view([5, 9], [[0, 1], [2, 3]], [[3], []])
    assert view.table.host_pages == ((3, 0, 1), (2, 3))
    assert view.frame_pos == (5, 9)
    with pytest.raises(ValueError, match="outside the pool"):
        pool.view([0], [[4]])
    with pytest.raises(ValueError, match="one per frame"):
        pool.view([0, 1], [[0]])


def test_memory_accounting_matches_allocation_and_design_figure():
    cfg = PRESETS["tiny"]
    pool = KVPool(cfg, 6, 12, dtype=torch.float16)
    est = memory_bytes(cfg, num_pages=6, tokens_per_page=12, num_prompts=2, dtype=torch.float16)
    assert est.pages == pool.nbytes
    model = CausalWanModel(cfg)
    assert est.weights == sum(p.numel() for p in model.parameters()) * 2
    assert (
        est.cross == sum(t.numel() * 2 for t in model.embed_context(torch.zeros(2, cfg.text_len, cfg.text_dim)).k) * 2
    )
    # DESIGN.md: Self-Forcing 1.3B cache for 21 latent frames of 1560 tokens is about 6 GB in bf16.
    big = memory_bytes("wan2.1-t2v-1.3b", num_pages=21, tokens_per_page=1560)
    assert 5.5e9 < big.pages < 6.5e9
    assert 2.7e9 < big.weights < 3.0e9
    with pytest.raises(ValueError, match="num_pages"):
        memory_bytes(cfg, num_pages=-1, tokens_per_page=4)


def test_config_presets_and_validation():
    assert ModelConfig.from_name("wan2.1-t2v-1.3b").head_dim == 128
    assert PRESETS["wan2.1-t2v-14b"].num_heads == 40
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        ModelConfig.from_name("nope")
    with pytest.raises(ValueError, match="num_heads=5 does not divide dim=64"):
        PRESETS["tiny"].replace(dim=64, num_heads=5)
    with pytest.raises(ValueError, match="odd head_dim"):
        PRESETS["tiny"].replace(dim=18, num_heads=2)
    with pytest.raises(ValueError, match="num_layers must be positive"):
        PRESETS["tiny"].replace(num_layers=0)
    with pytest.raises(ValueError, match="patch_size"):
        PRESETS["tiny"].replace(patch_size=(2, 2, 2))
    with pytest.raises(TypeError, match="dim"):
        PRESETS["tiny"].replace(dim=64.0)
    tiny = CausalWanModel("tiny")
    assert sum(p.numel() for p in tiny.parameters()) == PRESETS["tiny"].num_parameters()
    assert sum(p.numel() * 4 for p in tiny.parameters()) < 8 * 2**20  # a few MB


def test_forward_has_no_host_syncs(monkeypatch):
    """No .item()/.tolist() on tensors inside the forward (they would sync a GPU every layer)."""
    cfg = PRESETS["tiny"]
    model = CausalWanModel(cfg)
    pool = KVPool(cfg, 2, cfg.tokens_per_frame(4, 4))
    cross = model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim))
    view = pool.view([0, 1], [[0, 1]])
    calls = []
    for name in ("item", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: calls.append(_n) or _o(self, *a))
    with torch.no_grad():
        model(torch.randn(1, 2, cfg.in_channels, 4, 4), torch.zeros(1, 2), cross, view)
    assert calls == []


@pytest.mark.parametrize("layout_name", ["mmpl", "ar3"])
def test_teacher_forcing_call_equals_masked_forward_and_trains(layout_name):
    """One call over [clean | noisy] with a page list per query stage (no dense mask in the op) equals a
    dense-masked diffusers forward with the layout's training mask, and gradients flow through the pool."""
    from mmpl_fast.layouts import get_layout

    lay = get_layout(layout_name)
    seq = lay.training_sequence()
    n = lay.num_frames
    ref, ours, cfg = make_pair(2, 16, 1, 5)
    h, w = 2, 4
    tokens = cfg.tokens_per_frame(h, w)
    x = torch.randn(1, 2 * n, 4, h, w)  # call order
    t = torch.tensor([(1000.0 - 90 * lay.stage_of(f)) if z else 0.0 for f, z in zip(seq.frames, seq.noisy)])
    ctx = torch.randn(1, 5, 24)

    index = [f + (n if z else 0) for f, z in zip(seq.frames, seq.noisy)]
    allowed = lay.training_visibility()[index][:, index]  # the layout's mask, in call order
    mask = allowed.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    for blk in ref.blocks:
        blk.attn1.set_processor(MaskedProcessor(mask))
    ref.rope = PositionRope(ref.rope, seq.frames)
    with torch.no_grad():
        want = ref(x.transpose(1, 2), t.repeat_interleave(tokens)[None], ctx, return_dict=False)[0].transpose(1, 2)

    pool = KVPool(cfg, 2 * n, tokens)
    view = pool.view(seq.frames, [list(range(2 * n))], groups=seq.groups)
    got = ours(x, t[None], ours.embed_context(ctx), view)
    assert (got.detach() - want).abs().max().item() <= 1e-5
    got.square().mean().backward()
    assert ours.blocks[0].self_attn.k.weight.grad.abs().sum() > 0  # keys reach the loss through the pool pages


def test_triton_backend_model_equals_torch_backend():
    """The whole tiny model with every op on the (interpreted) Triton kernels equals the torch backend."""
    from mmpl_fast.kernels import use_backend

    cfg = PRESETS["tiny"]
    model = CausalWanModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    h, w = 4, 6
    tokens = cfg.tokens_per_frame(h, w)
    cross = model.embed_context(torch.randn(2, cfg.text_len, cfg.text_dim))
    outs = {}
    for backend in ("torch", "triton"):
        pool = KVPool(cfg, 12, tokens)
        with use_backend(backend), torch.no_grad():
            # a planning call writes frames 0..2, then a populate call reads them plus its own two frames
            model(torch.randn(2, 3, 16, h, w, generator=torch.Generator().manual_seed(1)), torch.full((2, 3), 900.0),
                  cross, pool.view([0, 1, 5], [[0, 1, 2], [6, 7, 8]]))  # fmt: skip
            view = pool.view([2, 3], [[3, 4], [9, 10]], [[0, 1, 2], [6, 7, 8]])
            x = torch.randn(2, 2, 16, h, w, generator=torch.Generator().manual_seed(2))
            outs[backend] = model(x, torch.tensor([[500.0, 500.0], [250.0, 250.0]]), cross, view)
    assert (outs["triton"] - outs["torch"]).abs().max().item() <= 1e-4
