"""Training: the teacher-forcing mask is the engine's inference visibility, the loss falls, resume is exact."""

from __future__ import annotations

import csv

import pytest
import torch

from mmpl_fast.components import TextEncoder
from mmpl_fast.config import resolve_config
from mmpl_fast.engine import SegmentJob, StageEngine
from mmpl_fast.kv_pool import CrossAttentionCache, KVPool
from mmpl_fast.layouts import LAYOUTS, custom, get_layout
from mmpl_fast.model import CrossKV
from mmpl_fast.sampling import make_sampler, training_table
from mmpl_fast.tiny import tiny_components
from mmpl_fast.world import train

# A 6-frame MMPL-like layout (start, plan 2 + 5, populate 3 4) for fast tests: 21 video frames.
MINI = custom("mini", 6, [((0, 1), (), "start"), ((2, 5), (0, 1), "plan"), ((3, 4), (0, 1, 2, 5), "populate")],
              handoff={"terminal": (4, 5)}, start_frames=2)  # fmt: skip
MINI_AR = custom("mini-ar", 6, [((0, 1), ()), ((2, 3), (0, 1)), ((4, 5), (0, 1, 2, 3))])
SMALL = dict(height=16, width=16, batch_size=2, num_clips=4, warmup=2, lr=1e-3, save_every=0)


class RecordingModel(torch.nn.Module):
    """Stands in for the DiT inside the engine: records every call's timestep and page table."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def embed_context(self, states):
        return CrossKV((states,), (states,))

    def forward(self, x, timesteps, cross, view):
        self.calls.append((float(timesteps[0, 0]), view))
        return torch.zeros_like(x)


def inference_visibility(layout, given: bool) -> torch.Tensor:
    """bool [2N, 2N] over [clean | noisy], read off the page tables of the calls the engine makes.

    A denoising call (t > 0) of stage k: its query frames are noisy rows; pages of its own frames are noisy
    columns, every other page holds a clean (t = 0) cached frame. A t = 0 cache pass: clean rows and columns.
    Frames never cache-passed (nothing later reads them) get the clean row the engine's view would give.
    """
    cfg = resolve_config("tiny")
    n = layout.num_frames
    model = RecordingModel(cfg)
    cross = CrossAttentionCache()
    cross.get(model, "p", torch.zeros(1, 2, 3))
    engine = StageEngine(model, layout, make_sampler("few-step", 2), {"cond": KVPool(cfg, n, 1)}, cross, seed=0)
    start = frozenset(range(layout.start_frames)) if given else frozenset()
    job = SegmentJob(index=1, prompt="p", latents=torch.zeros(n, cfg.in_channels, 2, 2), given=start)
    vis = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    cache_rows = {}
    for k in range(layout.num_stages):
        model.calls.clear()
        engine.run_stage([job], k)
        frame_of = {p: f for f, p in enumerate(engine.pages(job))}
        for t, view in model.calls:
            own = [frame_of[int(p)] for p in view.write_pages[0]]
            assert list(view.frame_pos) == own  # RoPE at true frame positions
            (pages,) = view.table.host_pages
            seen = [frame_of[p] for p in pages]
            for i in own:
                if t > 0:
                    vis[n + i, [n + j if j in own else j for j in seen]] = True
                else:
                    cache_rows[i] = seen
            if t > 0:
                for i in own:
                    cache_rows.setdefault(i, seen)  # the engine reuses this view for the cache pass
    for i, seen in cache_rows.items():
        vis[i, seen] = True
    return vis


def _layout(name: str):
    return {"mini": MINI, "mini-ar": MINI_AR}.get(name) or get_layout(name)


# (layout, whether its first frames come from a previous segment): the latter only for layouts that take them
MASK_CASES = [(name, given) for name in [*LAYOUTS, "ar1", "ar7", "mini", "mini-ar"] for given in (False, True)
              if not given or _layout(name).start_frames]  # fmt: skip


@pytest.mark.parametrize("name,given", MASK_CASES)
def test_training_mask_equals_engine_inference_visibility(name, given):
    layout = _layout(name)
    want = inference_visibility(layout, given)
    n = layout.num_frames
    got = layout.training_sequence().visibility(n)
    assert torch.equal(got, layout.training_visibility())
    if given:  # frames taken from the previous segment are only cached (clean), never denoised (no noisy rows)
        assert not want[n : n + layout.start_frames].any()
        got[n : n + layout.start_frames] = False
    assert torch.equal(got, want)


def test_prompt_states_equal_the_inference_text_encoder():
    c = tiny_components(0)
    prompts = ["a small red circle bouncing on a black background", ""]
    with torch.no_grad():
        got = train.encode_prompts(c["tokenizer"], c["text_encoder"], prompts, 16)
    want = TextEncoder(c["tokenizer"], c["text_encoder"], 16)(prompts)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", train.TIMESTEP_MODES)
def test_timesteps_are_per_stage_and_from_the_training_table(mode):
    layout = get_layout("mmpl")
    t, s = train.sample_timesteps(layout, 64, torch.Generator().manual_seed(0), mode)
    table_t, table_s = training_table(5.0)
    assert t.shape == s.shape == (64, 21)
    for stage in layout.stages:
        frames = list(stage.frames)
        assert (t[:, frames] == t[:, frames[:1]]).all() and (s[:, frames] == s[:, frames[:1]]).all()
    idx = torch.searchsorted(-table_t, -t.flatten())  # table_t decreases
    assert torch.equal(table_t[idx], t.flatten()) and torch.equal(table_s[idx], s.flatten())
    distinct = set(t.flatten().tolist())
    if mode == "few-step":
        assert distinct <= {1000.0, 937.5, float(table_t[500]), 625.0}
    else:
        assert len(distinct) > 40


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    cfg = train.TrainConfig(out=tmp_path, layouts=(MINI,), **SMALL)
    trainer = train.Trainer(cfg)
    batch = trainer.batch(0)
    assert batch["x0"].shape == (2, 6, 16, 2, 2)
    text_before = trainer.text_encoder.shared.weight.detach().clone()
    losses = []
    for _ in range(25):
        loss = trainer.loss(batch)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(trainer.text_encoder.shared.weight, text_before)  # the text encoder trains too


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    common = dict(layouts=(MINI, MINI_AR), **{**SMALL, "save_every": 2})  # the layouts alternate
    whole = train.train(train.TrainConfig(out=tmp_path / "a", steps=5, **common), progress=False, export=False)
    train.train(train.TrainConfig(out=tmp_path / "b", steps=2, **common), progress=False, export=False)
    rest = train.train(train.TrainConfig(out=tmp_path / "b", steps=5, **common), resume=True, progress=False)
    assert len(whole.losses) == 5 and len(rest.losses) == 3
    assert rest.losses == whole.losses[2:]
    rows = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == pytest.approx(whole.losses, abs=1e-6)
    # the exported pipeline loads through Pipeline.from_pretrained with the trained weights and generates
    from mmpl_fast import Pipeline

    pipe = Pipeline.from_pretrained(rest.pipeline)
    trained = train.Trainer(train.TrainConfig(out=tmp_path / "b", steps=5, **common))
    trained.load()
    for k, v in trained.model.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[k], v), k
    assert pipe.transformer.config.text_len == train.TEXT_LEN and pipe.default_size == (16, 16)
    out = pipe(prompt="a small red circle bouncing on a black background", num_frames=21, layout=MINI, seed=0,
               progress=False)  # fmt: skip
    assert out.frames.shape == (1, 21, 16, 16, 3)


def test_resume_rejects_other_settings_and_fresh_runs_keep_checkpoints(tmp_path):
    cfg = train.TrainConfig(out=tmp_path, layouts=(MINI,), steps=1, **SMALL)
    train.train(cfg, progress=False, export=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train.train(cfg, progress=False, export=False)
    other = train.TrainConfig(out=tmp_path, layouts=(MINI,), steps=2, **{**SMALL, "lr": 1e-4})
    with pytest.raises(ValueError, match="lr"):
        train.train(other, resume=True, progress=False, export=False)
    with pytest.raises(ValueError, match="no checkpoint"):
        train.train(train.TrainConfig(out=tmp_path / "new", layouts=(MINI,), **SMALL), resume=True, progress=False)


def test_cli_smoke_run_writes_checkpoint_and_pipeline(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(["--out", str(out), "--steps", "2", "--layouts", "ar", "--height", "16", "--width", "16",
                     "--batch-size", "1", "--num-clips", "2", "--quiet"])  # fmt: skip
    assert rc == 0
    assert (out / "checkpoint" / "transformer.safetensors").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert "trained 2 steps" in capsys.readouterr().out


BAD_FLAGS = [
    (["--steps", "0"], "steps must be"),
    (["--batch-size", "-1"], "batch_size must be"),
    (["--height", "40"], "multiples of 16"),
    (["--layouts", "spiral"], "unknown layout"),
    (["--layouts", ","], "at least one layout"),
    (["--lr", "0"], "lr must be"),
    (["--prompt-dropout", "1.5"], "prompt_dropout"),
    (["--config", "huge"], "unknown model config"),
    (["--init", "/nonexistent"], "not a pipeline folder"),
    (["--threads", "0"], "--threads must be > 0"),
    (["--resume"], "no checkpoint"),
    (["--vae-spatial", "4", "--height", "36"], "multiples of 8 (VAE 4x"),
    (["--vae-edge", "-1"], "vae_edge must be"),
    (["--vae-blocks", "-1"], "vae_blocks must be"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_cli_bad_flags_fail_cleanly(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "run"), "--quiet", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_help_documents_the_flags():
    text = train.build_parser().format_help()
    for flag in ("--out", "--resume", "--steps", "--layouts", "--timesteps", "--prompt-dropout", "--batch-size",
                 "--lr", "--num-clips", "--init", "--save-every"):  # fmt: skip
        assert flag in text
