"""dtype: bf16 by default on CUDA and fp32 on a CPU, ``torch_dtype=`` / ``--dtype`` reaching every component,
the numbers that need float32/float64 keeping it, and what bf16 does to a rollout."""

from __future__ import annotations

import pytest
import torch

from mmpl_fast import embedded
from mmpl_fast import model as model_module
from mmpl_fast.generate import build_parser, load_pipeline
from mmpl_fast.kernels import use_backend
from mmpl_fast.kv_pool import KVPool
from mmpl_fast.model import sinusoidal_embedding
from mmpl_fast.pipeline import Pipeline
from mmpl_fast.request import resolve_dtype

needs_embedded = pytest.mark.skipif(not embedded.available(), reason="the embedded model is not in this checkout")


def _dtypes(pipe: Pipeline) -> set[torch.dtype]:
    """Every floating dtype the pipeline's weights hold (DiT, VAE, text encoder)."""
    modules = [pipe.transformer, pipe.vae.vae] + ([pipe.text.encoder] if pipe.text is not None else [])
    return {t.dtype for m in modules for t in m.state_dict().values() if t.is_floating_point()}


def test_the_default_dtype_is_chosen_by_the_device():
    assert resolve_dtype(None, "cuda") is torch.bfloat16  # a device type only: no GPU needed to answer
    assert resolve_dtype(None, torch.device("cuda", 1)) is torch.bfloat16
    assert resolve_dtype(None, "cpu") is torch.float32
    named = {torch.bfloat16: ("bf16", "bfloat16", "torch.bfloat16"), torch.float16: ("fp16", "float16", "FP16"),
             torch.float32: ("fp32", "float32")}  # fmt: skip
    for want, names in named.items():
        assert all(resolve_dtype(n, "cpu") is want for n in names)
        assert resolve_dtype(want, "cuda") is want  # an explicit dtype wins over the device's default
    with pytest.raises(ValueError, match="torch_dtype 'int8' is not one of"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(TypeError, match="torch_dtype must be"):
        resolve_dtype(torch.float64, "cpu")


def test_the_cli_default_follows_the_device(monkeypatch):
    asked = []

    def from_pretrained(cls, path, *, device="cpu", torch_dtype=None, **kwargs):
        asked.append(resolve_dtype(torch_dtype, device))  # what the real one resolves (checked above)
        return "pipeline"

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(embedded, "available", lambda: True)
    for device, flag, want in (("cpu", None, torch.float32), ("cuda", None, torch.bfloat16),
                               ("cuda:1", "fp32", torch.float32), ("cpu", "bf16", torch.bfloat16)):  # fmt: skip
        assert load_pipeline(None, None, device, dtype=flag) == "pipeline"
        assert asked[-1] is want, (device, flag)


def test_dtype_flag_parses_every_name_and_refuses_others(capsys):
    parser = build_parser()
    for name in ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32"):
        assert parser.parse_args(["--prompt", "x", "--dtype", name]).dtype == name
    assert parser.parse_args(["--prompt", "x"]).dtype is None  # resolved from the device later
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--prompt", "x", "--dtype", "int8"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err


@needs_embedded
def test_torch_dtype_reaches_every_component_and_the_kv_pool():
    pipe = Pipeline.from_pretrained(embedded.ASSET, torch_dtype=torch.bfloat16)
    assert _dtypes(pipe) == {torch.bfloat16}
    assert KVPool.for_model(pipe.transformer, 2, 4).k.dtype == torch.bfloat16
    fp16 = Pipeline.from_pretrained(embedded.ASSET, dtype="fp16")  # the alias
    # transformers keeps umT5's FFN output projections ("wo") in float32 under fp16, against overflow
    assert _dtypes(fp16) == {torch.float16, torch.float32}
    kept = {n for n, t in fp16.text.encoder.state_dict().items() if t.dtype == torch.float32}
    assert kept and all(".wo." in n for n in kept)
    assert {t.dtype for m in (fp16.transformer, fp16.vae.vae) for t in m.state_dict().values()} == {torch.float16}
    assert _dtypes(Pipeline.from_pretrained(embedded.ASSET)) == {torch.float32}  # the CPU's default
    assert _dtypes(Pipeline.from_pretrained(embedded.ASSET, torch_dtype="bf16", dtype=torch.bfloat16)) == {
        torch.bfloat16
    }  # both, naming the same dtype
    with pytest.raises(ValueError, match="torch_dtype=.* and dtype=.* differ"):
        Pipeline.from_pretrained(embedded.ASSET, torch_dtype=torch.bfloat16, dtype=torch.float32)


def test_pipeline_to_moves_and_casts_every_component():
    pipe = Pipeline.tiny(torch_dtype="bf16")
    assert _dtypes(pipe) == {torch.bfloat16}
    assert pipe.to(torch.float32) is pipe and _dtypes(pipe) == {torch.float32}
    pipe.to("cpu", "fp16")
    assert _dtypes(pipe) == {torch.float16} and pipe.device == torch.device("cpu")
    pipe.to(dtype=torch.float32)
    assert _dtypes(pipe) == {torch.float32}
    with pytest.raises(TypeError, match="two devices"):
        pipe.to("cpu", "cpu")


def test_numbers_that_need_precision_keep_it_in_a_bf16_model():
    m = Pipeline.tiny(torch_dtype="bf16").transformer
    rope = m.rope(torch.device("cpu"))
    assert rope.cos.dtype == rope.sin.dtype == torch.float32  # RoPE: built in float64, kept in float32
    t = torch.tensor([[999.0, 1.0]])
    assert sinusoidal_embedding(8, t).dtype == torch.float64  # the timestep sinusoid, as Wan
    ln = m.blocks[0].norm3  # the float32 LayerNorm must run with bf16 weights (it failed on a CPU before)
    x = torch.randn(2, m.config.dim, dtype=torch.bfloat16)
    assert ln(x).dtype == torch.bfloat16 and torch.isfinite(ln(x).float()).all()


# ----------------------------------------------------------------------------------- bf16 against fp32
# A one-segment MMPL rollout of the embedded model (4 stages, its default sampler and steps) on the torch backend
# (the Triton interpreter has no bf16). The tolerance comes from what bf16 does to attention alone: the fp32
# model with stage attention's q, k and v rounded to bf16. Measured on this model (seed 0, the prompt below),
# as the mean absolute deviation of the output latents (which have a mean |x| of about 1.5):
#   attention inputs in bf16 only:  0.038
#   the whole pipeline in bf16:     0.112   (2.9x: every matrix product, the KV pool and the text encoder too)
# Mean, not max: a few outlier latents move by several units in both (max 2.1 and 7.3), the error of a rollout
# compounds through the sampler, and the mean is what shows in the frames (the decoded videos' mean deviation
# in [0, 1] pixels: 0.0067 and 0.019). Safety factor: 5 (the measured 2.9x with room), applied to the deviation
# measured in the same run, so the bound follows the model.
BF16_FACTOR = 5.0
ROLLOUT = dict(prompt="a red circle bouncing on a blue background", num_frames=81, seed=0, output_type="latent",
               progress=False, profile=False)  # fmt: skip


def _rollout(pipe: Pipeline, seen: set | None = None) -> torch.Tensor:
    hook = None
    if seen is not None:  # what the model is called with: the sampler state and the timesteps
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a: seen.add((a[0].dtype, a[1].dtype)))
    try:
        with use_backend("torch"):
            return pipe(**ROLLOUT).frames.float()
    finally:
        if hook is not None:
            hook.remove()


@needs_embedded
def test_bf16_rollout_stays_within_what_bf16_attention_alone_explains(monkeypatch):
    fp32 = embedded.load_pipeline("cpu", torch_dtype="fp32")
    ref = _rollout(fp32)
    attention = model_module.stage_attention

    def bf16_inputs(q, k, v, table):
        r = lambda x: x.to(torch.bfloat16).to(x.dtype)  # noqa: E731
        return attention(r(q), r(k), r(v), table)

    with monkeypatch.context() as m:
        m.setattr(model_module, "stage_attention", bf16_inputs)
        attn_only = (_rollout(fp32) - ref).abs().mean().item()

    pools = []
    for_model = KVPool.for_model.__func__
    monkeypatch.setattr(KVPool, "for_model", classmethod(lambda cls, *a, **k: pools.append(for_model(cls, *a, **k))
                                                         or pools[-1]))  # fmt: skip
    bf16, seen = embedded.load_pipeline("cpu", torch_dtype="bf16"), set()
    out = _rollout(bf16, seen)
    deviation = (out - ref).abs().mean().item()
    assert _dtypes(bf16) == {torch.bfloat16} and pools and all(p.k.dtype == torch.bfloat16 for p in pools)
    assert seen == {(torch.float32, torch.float32)}  # latents between steps and timesteps stay float32
    assert torch.isfinite(out).all()
    assert 0 < attn_only and 0 < deviation  # both really rounded something
    assert deviation <= BF16_FACTOR * attn_only, f"bf16 rollout deviates {deviation:.4f}, bound {attn_only:.4f} x 5"
