"""Memory that fits and no needless work: the pre-flight counts loaded weights once, device replicas are made
without a second copy on the source device, the text encoder can stay on the CPU, the weights' digest is
computed once and only for a workdir, and the transport's buffers live where the backend needs them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmpl_fast.scheduler as scheduler
import mmpl_fast.scheduler.profiling as profiling
from mmpl_fast import _generation, distributed
from mmpl_fast import pipeline as pipeline_module
from mmpl_fast.generate import build_parser
from mmpl_fast.pipeline import Pipeline, replicate, run_signature
from mmpl_fast.scheduler.execute import DistributedTransport, comm_device

CALL = dict(prompt="a red circle", num_frames=81, height=32, width=32, seed=3, output_type="latent", progress=False,
            profile=False)  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny(seed=0)


# ------------------------------------------------------------------------------------------------ pre-flight
def test_preflight_counts_the_loaded_weights_once_and_schedules_within_the_workspace(pipe, monkeypatch):
    """Free memory is read after loading: the device that holds the weights must not pay for them again, a
    device that will get a replica must."""
    plans, scheduled = [], []
    real_preflight, real_schedule = scheduler.preflight, scheduler.schedule

    def preflight(*args, **kwargs):
        plans.append((kwargs, real_preflight(*args, **kwargs)))
        return plans[-1][1]

    monkeypatch.setattr(scheduler, "preflight", preflight)
    monkeypatch.setattr(scheduler, "schedule", lambda *a, **k: scheduled.append(k) or real_schedule(*a, **k))
    with monkeypatch.context() as m:
        devs = [torch.device("cpu"), torch.device("cuda", 1)]  # the second only as a name: nothing runs there
        m.setattr(Pipeline, "_devices", lambda self, req: devs)
        m.setattr(pipeline_module, "_free_memory", lambda d: 10**9)
        m.setattr(profiling, "device_name", str)
        placement = pipe._preflight(pipe._request(pipeline_module.CallArgs(**CALL)))
    ((kwargs, plan),) = plans
    assert kwargs["loaded"] == [{"weights"}, set()]
    weights = plan.breakdown.dit_weights + plan.breakdown.vae_weights
    room = [10**9 - plan.fixed_bytes + weights, 10**9 - plan.fixed_bytes]  # what each device has for segments
    assert list(plan.capacity) == [r // plan.segment_bytes for r in room]
    assert plan.capacity[0] > plan.capacity[1]  # the weights once: only where they are not loaded yet
    # the workspace handed to the scheduler: what is left with the segments the run may really hold
    for i, (cap, k) in enumerate(zip(plan.capacity, placement["capacity"])):
        assert placement["workspace"][i] == plan.workspace[i] + (cap - k) * plan.segment_bytes
    assert scheduled == []
    pipe(**CALL)  # a real call passes it on
    workers = len(plans[-1][0]["loaded"])  # CPU workers (`cpu.cpu_workers`) share the pipeline's weights
    assert plans[-1][0]["loaded"] == [{"weights"}] * workers
    assert scheduled and all(len(k["workspace"]) == workers and None not in k["workspace"] for k in scheduled)


# -------------------------------------------------------------------------------------------------- replicas
class SourceAllocations(TorchDispatchMode):
    """Bytes of new CPU storage the ops inside allocate (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = lambda x: list(x) if isinstance(x, (list, tuple)) else [x]  # noqa: E731
        seen = {t.untyped_storage().data_ptr() for t in flat(args) + list((kwargs or {}).values())
                if isinstance(t, torch.Tensor) and t.device.type == "cpu"}  # fmt: skip
        for t in flat(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in seen:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_replica_is_bit_identical_and_its_own_copy(pipe):
    for source in (pipe.transformer, pipe.vae.vae):
        copy_ = replicate(source, "cpu")
        src, out = _tensors(source), _tensors(copy_)
        assert src.keys() == out.keys() and type(copy_) is type(source)
        for name, t in src.items():
            r = out[name]
            assert r.dtype == t.dtype and torch.equal(r, t), name
            assert r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), name
            assert isinstance(r, torch.nn.Parameter) == isinstance(t, torch.nn.Parameter)
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():  # the copy computes what the source does
        assert torch.equal(replicate(pipe.vae.vae, "cpu").decode(z).sample, pipe.vae.vae.decode(z).sample)


def test_a_replica_makes_no_second_copy_on_the_source_device(pipe):
    weights = sum(t.numel() * t.element_size() for m in (pipe.transformer, pipe.vae.vae)
                  for t in _tensors(m).values())  # fmt: skip
    with SourceAllocations() as naive:  # what the old way costs: a full copy on the source, then the move
        copy.deepcopy(pipe.transformer).to("meta"), copy.deepcopy(pipe.vae.vae).to("meta")
    assert naive.bytes >= weights  # the recorder sees that copy
    pipe.__dict__.pop("_replicas", None)
    with SourceAllocations() as made:  # the pipeline's replica for another device ("meta" stands in for a GPU)
        model, vae = pipe._replica(torch.device("meta"))
    assert model.device.type == "meta" and vae.device.type == "meta"
    assert made.bytes < 0.05 * weights, f"{made.bytes} bytes allocated on the source device for {weights} of weights"
    pipe.__dict__.pop("_replicas", None)


# ------------------------------------------------------------------------------------------------ offload
def test_offloaded_text_encoder_stays_on_the_cpu_and_changes_nothing(pipe):
    ref = pipe(**CALL).frames
    off = Pipeline.tiny(seed=0)
    inputs = []
    off.text.encoder.register_forward_pre_hook(lambda m, args: inputs.append(args[0].device))
    assert off.enable_model_cpu_offload() is None  # as diffusers'
    off.to(torch.float32)  # moving or casting the pipeline leaves the encoder on the CPU
    assert {p.device.type for p in off.text.encoder.parameters()} == {"cpu"}
    assert torch.equal(off(**CALL).frames, ref)
    assert inputs and set(inputs) == {torch.device("cpu")}  # the prompt was encoded on the CPU
    prompt, negative = off.encode_prompt("a red circle")
    assert prompt.device == negative.device == off.device  # the embeddings go where the DiT is
    assert {p.device.type for p in off.text.encoder.parameters()} == {"cpu"}
    assert build_parser().parse_args(["--prompt", "x", "--offload"]).offload
    assert not build_parser().parse_args(["--prompt", "x"]).offload


# ----------------------------------------------------------------------------------------------- signature
def test_the_weights_digest_is_computed_once_and_only_for_a_workdir(monkeypatch, tmp_path):
    p = Pipeline.tiny(seed=0)
    calls = []
    real = pipeline_module.weights_digest
    monkeypatch.setattr(pipeline_module, "weights_digest", lambda m: calls.append(m) or real(m))
    p(**CALL)
    p(**CALL)
    assert calls == []  # no workdir: no weight is read for a digest
    p(**CALL, workdir=tmp_path / "a")
    p(**CALL, workdir=tmp_path / "a")  # resumes (everything is done): same signature, digest from the cache
    p(**CALL, workdir=tmp_path / "b")
    assert calls == [p.transformer]
    assert p._weights_digest() == real(p.transformer)  # the cached digest is a fresh one
    before = torch.get_num_threads()
    try:  # exact bits, not a float sum whose rounding follows the thread count (the call ran on one thread)
        digests = {torch.set_num_threads(n) or real(p.transformer) for n in (1, 2)}
    finally:
        torch.set_num_threads(before)
    assert digests == {p._weights_digest()}
    assert run_signature("x", p._weights_digest()) == run_signature("x", p.transformer)  # (computes one: +1)
    before, n, bias = p._weights_digest(), len(calls), p.transformer.head.head.bias.detach().clone()
    with torch.no_grad():
        p.transformer.head.head.bias.add_(1.0)  # weights changed in place
    assert p._weights_digest() != before and len(calls) == n + 1
    p.transformer.head.head.bias = torch.nn.Parameter(bias)  # replaced (by the original values)
    assert p._weights_digest() == before and len(calls) == n + 2
    p.to(torch.bfloat16)  # cast
    assert p._weights_digest() == real(p.transformer) != before and len(calls) == n + 3
    p._weights_digest()
    assert len(calls) == n + 3


# ----------------------------------------------------------------------------------------------- transport
class Comm:
    """The part of torch.distributed `comm_device` and `DistributedTransport.__init__` read."""

    def __init__(self, backend: str):
        self.backend = backend

    def get_backend(self) -> str:
        return self.backend

    def get_rank(self) -> int:
        return 1


def test_transport_buffers_live_where_the_backend_moves_them(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    cpu, gpu1 = torch.device("cpu"), torch.device("cuda", 1)
    assert comm_device(Comm("gloo")) == cpu
    assert comm_device(Comm("gloo"), "cuda:0") == cpu  # gloo moves CPU tensors whatever the model's device
    assert comm_device(Comm("nccl")) == gpu1  # the rank's GPU, as torchrun's LOCAL_RANK says
    assert comm_device(Comm("nccl"), "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="NCCL moves CUDA tensors"):
        comm_device(Comm("nccl"), "cpu")
    assert DistributedTransport(comm=Comm("nccl")).comm_device == gpu1
    assert DistributedTransport(comm=Comm("gloo")).comm_device == cpu
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    assert distributed.comm_device() == gpu1 == _generation._comm_device()  # collectives: the same rule
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # no LOCAL_RANK: the current device
    assert comm_device(Comm("nccl")) == torch.device("cuda", 2)
