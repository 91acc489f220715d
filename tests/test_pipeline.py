"""End-to-end generation with tiny random components: chain arithmetic, re-encoding, determinism,
resume, output types, callbacks and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpl_fast.chain import REENCODE_VIDEO_FRAMES, ChainPlan, reencode
from mmpl_fast.engine import StageEngine
from mmpl_fast.layouts import ar, mmpl
from mmpl_fast.pipeline import Pipeline, PipelineOutput

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny(seed=0)


@pytest.mark.parametrize("mode,layout", [("terminal", mmpl()), ("middle", mmpl()), ("terminal", ar())])
def test_chain_frame_counts(mode, layout):
    plan = ChainPlan(layout, mode)
    kept = 21 if mode == "terminal" else 13
    assert plan.kept_latents == kept
    first = 1 + (kept - 1) * 4
    for n in range(1, 6):
        assert plan.video_frames(n) == first + (n - 1) * (first - REENCODE_VIDEO_FRAMES)
        assert plan.segments_for(plan.video_frames(n)) == n
        assert plan.segments_for(plan.video_frames(n) + 1) == n + 1
    if mode == "terminal":
        assert plan.video_frames(1) == 81 and plan.video_frames(2) == 81 + 76
    assert plan.start_latents == 2


def test_chain_stages_split():
    plan = ChainPlan(mmpl(), "terminal")
    assert plan.chain_stages() == [0, 1] and plan.populate_stages() == [2, 3]
    assert ChainPlan(ar(), "terminal").populate_stages() == []
    with pytest.raises(ValueError, match="no 'middle' handoff"):
        ChainPlan(ar(), "middle")
    with pytest.raises(ValueError, match="chain mode"):
        ChainPlan(mmpl(), "sideways")


def test_reencode_decodes_f0_p19_p19_p20_and_keeps_last_five(pipe):
    latents = torch.randn(21, 16, 4, 4)
    seen = {}
    vae = pipe.vae
    orig_decode, orig_encode = vae.decode, vae.encode

    def decode(z):
        seen["decoded"] = z.clone()
        return orig_decode(z)

    def encode(v):
        seen["encoded"] = v.shape
        return orig_encode(v)

    vae.decode, vae.encode = decode, encode
    try:
        out = reencode(vae, latents, ChainPlan(mmpl(), "terminal"))
    finally:
        del vae.decode, vae.encode
    assert torch.equal(seen["decoded"][0], latents[[0, 19, 19, 20]])
    assert seen["encoded"][2] == REENCODE_VIDEO_FRAMES
    assert out.shape == (2, 16, 4, 4)


def test_segment_prompts_reach_their_segments(pipe, monkeypatch):
    seen = {}
    orig = StageEngine.run_stage

    def spy(self, jobs, stage, callback=None):
        for j in jobs:
            seen.setdefault(j.index, set()).add(j.prompt)
        return orig(self, jobs, stage, callback)

    monkeypatch.setattr(StageEngine, "run_stage", spy)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    n = ChainPlan(mmpl()).video_frames(3)
    pipe(segment_prompts=prompts, num_frames=n, output_type="latent", progress=False, **SIZE)
    assert seen == {i: {p} for i, p in enumerate(prompts)}
    with pytest.raises(ValueError, match="segment_prompts has 2 prompts but the video needs 3 segments"):
        pipe(segment_prompts=prompts[:2], num_frames=n, **SIZE)


def test_prompt_schedule_switches_at_segment_starts(pipe):
    from mmpl_fast.request import segment_prompts

    plan = ChainPlan(mmpl())
    got = segment_prompts(None, None, [(0, "a"), (5.0, "b"), (9.6, "c")], 3, plan)
    # segment 1 starts at 81/16 = 5.06 s, segment 2 at 157/16 = 9.81 s
    assert got == ["a", "b", "c"]


def run_latents(pipe, **kw):
    """Each segment's latents ``[S, F, C, h, w]`` (the frames its video shows), as `stream` yields them."""
    segs = pipe.stream(**{"prompt": "a red circle", **kw}, output_type="latent", progress=False, **SIZE)
    return torch.stack([seg.latents for seg in segs])


def test_same_seed_same_latents_and_batching_invariance(pipe, monkeypatch, tmp_path):
    # The adaptive policy packs launches by the cached profile, which earlier tests of a session fill with times
    # measured on a loaded machine: plan from the cost estimate alone, so that this run does batch segments.
    monkeypatch.setenv("MMPL_FAST_CACHE_DIR", str(tmp_path))
    n = ChainPlan(mmpl()).video_frames(3)
    out = pipe(prompt="a red circle", output_type="latent", progress=False, num_frames=n, seed=7, batch_segments=3,
               **SIZE)  # fmt: skip
    assert max(len(g) for g in out.info["measured"].launches()) > 1  # some launch did batch segments
    a = run_latents(pipe, num_frames=n, seed=7, batch_segments=3)
    b = run_latents(pipe, num_frames=n, seed=7, batch_segments=3)
    c = run_latents(pipe, num_frames=n, seed=7, batch_segments=1)
    d = run_latents(pipe, num_frames=n, seed=8, batch_segments=3)
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # batched populate == one segment at a time (batch-invariant model)
    assert not torch.allclose(a, d)


def test_resume_after_interruption_equals_uninterrupted(pipe, tmp_path):
    n = ChainPlan(mmpl()).video_frames(3)
    full = run_latents(pipe, num_frames=n, seed=3, batch_segments=1)

    class Stop(Exception):
        pass

    def crash(p, i, t, kw):
        if p.current_segment == 2:
            raise Stop

    with pytest.raises(Stop):
        run_latents(pipe, num_frames=n, seed=3, batch_segments=1, workdir=tmp_path, callback_on_step_end=crash)
    assert sorted(f.name for f in tmp_path.glob("segment_*")) == [
        "segment_00000.safetensors",
        "segment_00001.safetensors",
    ]
    resumed = run_latents(pipe, num_frames=n, seed=3, batch_segments=1, workdir=tmp_path)
    assert torch.equal(full, resumed)
    with pytest.raises(ValueError, match="holds a different run"):
        run_latents(pipe, num_frames=n, seed=4, batch_segments=1, workdir=tmp_path)


def test_output_types_and_shapes(pipe):
    n = 81 + 10
    out = pipe(prompt="a red circle", num_frames=n, seed=0, progress=False, **SIZE)
    assert isinstance(out, PipelineOutput)
    assert out.frames.shape == (1, n, 32, 32, 3) and out.frames.dtype == np.float32
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    (pt,) = pipe(
        prompt="a red circle", num_frames=9, seed=0, output_type="pt", return_dict=False, progress=False, **SIZE
    )
    assert pt.shape == (1, 9, 3, 32, 32)
    pil = pipe(prompt="a red circle", num_frames=5, seed=0, output_type="pil", progress=False, **SIZE).frames
    assert len(pil[0]) == 5 and pil[0][0].size == (32, 32)
    lat = pipe(prompt="a red circle", num_frames=n, seed=0, output_type="latent", progress=False, **SIZE).frames
    assert lat.shape == (1, 16, 21 + 19, 4, 4)  # diffusers' [B, C, F, h, w]: segment 1 adds 19 new frames
    per_segment = run_latents(pipe, num_frames=n, seed=0)
    assert torch.equal(lat[0].transpose(0, 1), torch.cat([per_segment[0], per_segment[1, 2:]]))


def test_callback_can_replace_latents(pipe):
    def zero_plan(p, i, t, kw):
        if p.current_stage == 1:
            return {"latents": torch.zeros_like(kw["latents"])}
        return {}

    lat = pipe(prompt="x", num_frames=81, seed=0, output_type="latent", progress=False,
               callback_on_step_end=zero_plan, **SIZE).frames.transpose(1, 2)  # fmt: skip
    plan_frames = list(mmpl().stages[1].frames)
    assert torch.count_nonzero(lat[0, plan_frames]) == 0
    assert torch.count_nonzero(lat[0, [4, 5, 6]]) > 0


def test_image_start_uses_the_chain_path(pipe):
    img = np.full((32, 32, 3), 200, dtype=np.uint8)
    lat = run_latents(pipe, prompt="x", image=img, num_frames=81, seed=0)
    expect = pipe.vae.encode(torch.full((1, 3, 1, 32, 32), 200 / 127.5 - 1))[0]
    assert torch.allclose(lat[0, :1], expect, atol=1e-5)


def test_from_pretrained_round_trip(pipe, tmp_path, monkeypatch):
    from mmpl_fast import loading

    pipe.save_pretrained(tmp_path / "p")
    reads = []
    read = loading._read_safetensors
    monkeypatch.setattr(loading, "_read_safetensors", lambda path: reads.append(path) or read(path))
    again = Pipeline.from_pretrained(tmp_path / "p")
    assert len(reads) == 1, f"the transformer weights were read {len(reads)} times"  # format and weights in one pass
    monkeypatch.undo()
    assert again.kind == "tiny" and again.default_size == pipe.default_size
    a = run_latents(pipe, num_frames=9, seed=1)
    b = run_latents(again, num_frames=9, seed=1)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="vae"):
        import shutil

        shutil.rmtree(tmp_path / "p" / "vae")
        Pipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        Pipeline.from_pretrained(tmp_path / "missing")


BAD_CALLS = [
    (dict(height=0), "height"),
    (dict(height=-16), "height"),
    (dict(width=30), "width"),
    (dict(height=40), "multiple of 16"),
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=-3), "num_frames"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(output_type="gif"), "output_type"),
    (dict(mode="bidirectional"), "mode"),
    (dict(layout="spiral"), "unknown layout"),
    (dict(chain="sideways"), "chain mode"),
    (dict(prompt=""), "non-empty"),
    (dict(prompt=[]), "empty list of prompts"),
    (dict(prompt=["a", ""]), "non-empty"),
    (dict(prompt=None, segment_prompts=[]), "empty"),
    (dict(prompt=None, segment_prompts=["a", "b"]), "needs 1 segments"),
    (dict(prompt=None, prompt_schedule=[(1.0, "a")]), "start at 0"),
    (dict(seed=-1), "seed"),
    (dict(batch_segments=0), "batch_segments"),
    (dict(image=np.zeros((16, 16, 3), np.uint8)), "expected"),
    (dict(image=np.zeros((32, 32, 3), np.uint8), video=[np.zeros((32, 32, 3), np.uint8)]), "not both"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
]


@pytest.mark.parametrize("kwargs,match", BAD_CALLS)
def test_bad_pipeline_inputs(pipe, kwargs, match, tmp_path):
    call = dict(prompt="a red circle", num_frames=9, progress=False, workdir=tmp_path / "work", **SIZE)
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**call)
    assert not (tmp_path / "work").exists()  # checked before anything is written


def test_reencode_without_the_zero_padding_equals_the_padded_encode(pipe):
    """The authors zero-pad the 5 kept frames to a segment before encoding; with a causal VAE the first two
    latents do not see the padding, which is why `chain.reencode` skips it."""
    frames = torch.rand(1, 3, REENCODE_VIDEO_FRAMES, 32, 32) * 2 - 1
    padded = torch.cat([frames, torch.zeros(1, 3, 81 - REENCODE_VIDEO_FRAMES, 32, 32)], dim=2)
    alone, full = pipe.vae.encode(frames)[0], pipe.vae.encode(padded)[0, :2]
    assert alone.shape[0] == 2 and torch.allclose(alone, full, atol=1e-5)


def test_guidance_runs_two_cached_branches(pipe, monkeypatch):
    calls = []
    orig = StageEngine._call

    def spy(self, jobs, views, x, t, branch):
        calls.append(branch)
        return orig(self, jobs, views, x, t, branch)

    monkeypatch.setattr(StageEngine, "_call", spy)
    a = run_latents(pipe, num_frames=9, seed=0, guidance_scale=3.0, negative_prompt="blurry")
    assert calls.count("uncond") == calls.count("cond") > 0
    calls.clear()
    b = run_latents(pipe, num_frames=9, seed=0, guidance_scale=1.0)
    assert "uncond" not in calls
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="ar"),
        dict(chain="middle"),
        dict(layout="mmpl-no-mid"),
        dict(sampler="unipc", num_inference_steps=3),
        dict(sampler="euler", num_inference_steps=2),
    ],
)
def test_modes_layouts_and_samplers_run(pipe, kwargs):
    lat = run_latents(pipe, num_frames=100, seed=0, **kwargs)
    assert lat.shape[0] == (3 if kwargs.get("chain") == "middle" else 2)  # middle: 49 frames, then 44 each
    assert torch.isfinite(lat).all()
    assert lat.abs().sum() > 0


def test_ar_mode_runs_every_stage_in_the_chain(pipe, monkeypatch):
    order = []
    orig = StageEngine.run_stage

    def spy(self, jobs, stage, callback=None):
        order.append((tuple(j.index for j in jobs), stage))
        return orig(self, jobs, stage, callback)

    monkeypatch.setattr(StageEngine, "run_stage", spy)
    run_latents(pipe, num_frames=100, seed=0, mode="ar")
    assert order == [((s,), k) for s in range(2) for k in range(7)]


def test_middle_chain_skips_the_stage_whose_frames_the_video_drops(pipe, monkeypatch):
    import mmpl_fast.scheduler as scheduler
    from mmpl_fast import chain

    calls = []
    orig = StageEngine._call

    def spy(self, jobs, views, x, t, branch):
        calls.append((self._stage_now, t))
        return orig(self, jobs, views, x, t, branch)

    def run_stage(self, jobs, stage, callback=None):
        self._stage_now = stage
        return orig_stage(self, jobs, stage, callback)

    orig_stage = StageEngine.run_stage
    monkeypatch.setattr(StageEngine, "_call", spy)
    monkeypatch.setattr(StageEngine, "run_stage", run_stage)
    kw = dict(prompt="a red circle", num_frames=49 + 44, seed=3, chain="middle", progress=False, **SIZE)
    pruned = pipe(**kw, output_type="pt")
    pruned_latents = torch.stack([s.latents for s in pipe.stream(**kw, output_type="latent")])
    ran = list(calls)
    assert {k for k, _ in ran} == {0, 1, 2}  # stage 3 (frames 13..18) is never run ...
    assert not [k for k, t in ran if k == 2 and t == 0.0]  # ... nor stage 2's cache pass that only it would read
    assert pruned_latents.shape[:2] == (2, 13)  # latents of the frames the video shows
    # Running every stage, as before, gives the same video: the pruned work never reached it.
    monkeypatch.setattr(chain.ChainPlan, "stages", property(lambda self: tuple(range(self.layout.num_stages))))
    build = scheduler.build_dag
    monkeypatch.setattr(scheduler, "build_dag", lambda *a, **k: build(*a, **k, prune=False))
    calls.clear()
    everything = pipe(**kw, output_type="pt")
    assert {k for k, _ in calls} == {0, 1, 2, 3}
    assert torch.equal(pruned.frames, everything.frames)


@pytest.mark.parametrize("chain", ["terminal", "middle"])
def test_progress_bar_ends_full(pipe, monkeypatch, chain):
    import mmpl_fast.pipeline as pipeline_mod

    bars = []

    class Bar(pipeline_mod.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(pipeline_mod, "tqdm", Bar)
    pipe(prompt="a red circle", num_frames=100, seed=0, chain=chain, output_type="latent", progress=True, **SIZE)
    plan = ChainPlan(mmpl(), chain)
    assert bars and all(b == bars[0] for b in bars)  # tqdm may close a bar more than once
    n, total = bars[0]
    assert n == total == plan.segments_for(100) * len(plan.stages)


def test_engine_runs_only_the_stages_it_is_given(pipe):
    from mmpl_fast.engine import SegmentJob
    from mmpl_fast.kv_pool import CrossAttentionCache, KVPool
    from mmpl_fast.sampling import make_sampler

    model, lay = pipe.transformer, mmpl()
    parts = (model, lay, make_sampler("few-step", 2), {"cond": KVPool.for_model(model, 21, 4)}, CrossAttentionCache())
    engine = StageEngine(*parts, seed=0, stages=(0, 1, 2))
    job = SegmentJob(index=0, prompt="p", latents=torch.zeros(21, model.config.in_channels, 4, 4))
    with pytest.raises(ValueError, match=r"stage 3 is not one this engine runs \(\(0, 1, 2\)\)"):
        engine.run_stage([job], 3)
    with pytest.raises(ValueError, match="has stages 0..3"):
        StageEngine(*parts, seed=0, stages=(0, 4))


def test_engine_pages_from_many_threads_stay_disjoint_and_in_step(pipe):
    import threading

    from mmpl_fast.engine import SegmentJob
    from mmpl_fast.kv_pool import CrossAttentionCache, KVPool
    from mmpl_fast.sampling import make_sampler

    model, lay, n = pipe.transformer, mmpl(), 8
    pools = {b: KVPool.for_model(model, 21 * n, 4) for b in ("cond", "uncond")}
    engine = StageEngine(model, lay, make_sampler("few-step", 2), pools, CrossAttentionCache(), seed=0, guidance=2.0)
    jobs = [SegmentJob(index=i, prompt="p", latents=torch.zeros(1)) for i in range(n)]
    start, errors, got = threading.Barrier(n), [], {}

    def take(job):
        start.wait()  # every thread asks at once, as stream launches do
        try:
            got[job.index] = engine.pages(job)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=take, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p for pages in got.values() for p in pages) == list(range(21 * n))
    for job in jobs:
        engine.release(job)
    assert all(len(pool._free) == 21 * n for pool in pools.values())


def test_video_start_and_self_forcing_checkpoint(pipe, tmp_path):
    clip = [np.full((32, 32, 3), v, dtype=np.uint8) for v in range(0, 240, 30)]
    lat = run_latents(pipe, num_frames=9, seed=0, video=clip)
    expect = pipe.vae.encode(torch.stack([torch.full((3, 32, 32), v / 127.5 - 1) for v in range(90, 240, 30)], 1)[None])
    assert torch.allclose(lat[0, :2], expect[0], atol=1e-5)
    # A Self-Forcing .pt replaces the folder's transformer and switches the defaults to few-step.
    pipe.save_pretrained(tmp_path / "p")
    sd = {"model." + k: v for k, v in pipe.transformer.state_dict().items()}
    torch.save({"generator_ema": sd}, tmp_path / "sf.pt")
    sf = Pipeline.from_pretrained(tmp_path / "p", transformer=tmp_path / "sf.pt")
    assert sf.kind == "self_forcing"
    assert torch.allclose(run_latents(sf, num_frames=9, seed=2), run_latents(pipe, num_frames=9, seed=2), atol=1e-5)


def test_checkpoint_kind_and_saved_overrides_set_the_sampling_defaults(tmp_path):
    """Self-Forcing-type weights sample with 4 few-step steps; MMPL's released weights (a .pt like Self-Forcing's,
    so the kind is said, `--kind mmpl` on the CLI) with 50 UniPC steps, shift 5, guidance 5; a folder's saved
    overrides (the embedded model's trained shift) win over its kind's defaults."""
    pipe = Pipeline.tiny(seed=0)
    pipe.save_pretrained(tmp_path / "p")
    for kind, want in (("self_forcing", ("few-step", 4, 5.0, 1.0)), ("mmpl", ("unipc", 50, 5.0, 5.0))):
        info = Pipeline.from_pretrained(tmp_path / "p", kind=kind)(
            prompt="a red circle", num_frames=5, output_type="latent", progress=False, profile=False, **SIZE
        ).info
        assert (info["sampler"], info["steps"], info["shift"], info["guidance"]) == want, kind
    pipe.sampling = {"shift": 3.0, "steps": 2}
    pipe.save_pretrained(tmp_path / "q")
    back = Pipeline.from_pretrained(tmp_path / "q")
    assert back.sampling == {"shift": 3.0, "steps": 2}
    info = back(prompt="a red circle", num_frames=5, output_type="latent", progress=False, profile=False, **SIZE).info
    assert (info["shift"], info["steps"]) == (3.0, 2)
    with pytest.raises(ValueError, match="sampling: unknown keys"):
        Pipeline.tiny().__class__(pipe.transformer, pipe.vae.vae, pipe.text.encoder, pipe.text.tokenizer,
                                  sampling={"cfg": 2})  # fmt: skip


# ------------------------------------------------------------------------------- diffusers' inputs
@pytest.mark.parametrize("kwargs", [dict(), dict(chain="middle"), dict(mode="ar"), dict(image=np.full((32, 32, 3), 90,
                                    np.uint8))], ids=["mmpl", "middle-chain", "ar", "image-start"])  # fmt: skip
def test_latents_replace_the_step_0_noise_of_the_whole_video(pipe, kwargs):
    n = ChainPlan(mmpl() if kwargs.get("mode") != "ar" else ar(), kwargs.get("chain", "terminal")).video_frames(2)
    call = dict(prompt="a red circle", num_frames=n, seed=4, output_type="latent", progress=False, profile=False,
                **SIZE, **kwargs)  # fmt: skip
    keyed = pipe.prepare_latents(4, n, **SIZE, **kwargs)
    plan = ChainPlan(mmpl() if kwargs.get("mode") != "ar" else ar(), kwargs.get("chain", "terminal"))
    assert keyed.shape == (1, 16, plan.video_latent_frames(2), 4, 4)
    base = pipe(**call).frames
    assert base.shape == keyed.shape  # the output latents have the input's layout
    assert torch.equal(pipe(**call, latents=keyed).frames, base)  # the keyed noise itself: the keyed output
    other = torch.randn(keyed.shape, generator=torch.Generator().manual_seed(1))
    a, b = pipe(**call, latents=other).frames, pipe(**call, latents=other.clone()).frames
    assert torch.equal(a, b) and not torch.allclose(a, base, atol=1e-3)  # same latents twice: same video
    # every segment's noise is used: changing one frame of the last segment changes that segment only
    tweaked = other.clone()
    tweaked[:, :, -1] += 1
    c = pipe(**call, latents=tweaked).frames
    last = plan.video_latent_span(1)[1]
    assert torch.equal(c[:, :, :last], a[:, :, :last]) and not torch.equal(c[:, :, last:], a[:, :, last:])


def test_generator_gives_one_draw_per_video_whatever_the_device_count(pipe):
    call = dict(prompt="a red circle", num_frames=ChainPlan(mmpl()).video_frames(2), output_type="latent",
                progress=False, profile=False, **SIZE)  # fmt: skip
    g1, g2, fresh = (torch.Generator().manual_seed(11) for _ in range(3))
    one = pipe(**call, generator=g1, devices=["cpu"])
    two = pipe(**call, generator=g2, devices=["cpu", "cpu"])
    seed = int(torch.randint(0, 2**63 - 1, (), generator=fresh))  # the documented mapping
    assert one.info["seeds"] == two.info["seeds"] == [seed]
    assert torch.equal(one.frames, two.frames)
    assert torch.equal(g1.get_state(), fresh.get_state()) and torch.equal(g2.get_state(), fresh.get_state())
    assert torch.equal(pipe(**call, seed=seed).frames, one.frames)
    again = pipe(**call, generator=g1)  # as diffusers: a reused generator gives a new video
    assert again.info["seeds"] != [seed] and not torch.equal(again.frames, one.frames)


def test_videos_per_prompt_and_prompt_lists_are_the_single_videos_of_their_seeds(pipe):
    call = dict(num_frames=9, output_type="latent", progress=False, profile=False, **SIZE)
    out = pipe(prompt=["a red circle", "a blue square"], num_videos_per_prompt=2, seed=20, **call)
    assert out.frames.shape[0] == 4 and out.info["seeds"] == [20, 21, 22, 23]
    for b, (prompt, seed) in enumerate([("a red circle", 20), ("a red circle", 21), ("a blue square", 22)]):
        assert torch.equal(out.frames[b], pipe(prompt=prompt, seed=seed, **call).frames[0])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    listed = pipe(prompt="a red circle", num_videos_per_prompt=2, generator=gens, **call)
    assert listed.info["seeds"][0] == int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(1)))
    np_out = pipe(prompt="a red circle", num_videos_per_prompt=2, seed=20, **{**call, "output_type": "np"})
    assert np_out.frames.shape == (2, 9, 32, 32, 3)


def test_prompt_embeds_stand_for_the_encoded_prompt(pipe):
    call = dict(num_frames=9, seed=3, output_type="latent", progress=False, profile=False, guidance_scale=2.0, **SIZE)
    states = pipe.text(["a red circle"])
    negative = pipe.text([""])
    by_text = pipe(prompt="a red circle", **call).frames
    by_embeds = pipe(prompt_embeds=states, negative_prompt_embeds=negative, **call).frames
    assert torch.equal(by_text, by_embeds)
    shorter = pipe(prompt_embeds=states[:, :5], negative_prompt_embeds=negative, **call).frames  # used as given
    assert not torch.allclose(shorter, by_text)
