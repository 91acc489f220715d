"""Device correctness without a GPU: what runs under which CUDA device, proven with recording stand-ins.

* Training never reaches the Triton ops (they have no autograd), even when the dispatcher sees CUDA tensors.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import mmpl_fast.kernels
from mmpl_fast.kv_pool import KVPool
from mmpl_fast.layouts import custom
from mmpl_fast.model import CausalWanModel
from mmpl_fast.world import train

# A 6-frame MMPL-like layout (start, plan 2 + 5, populate 3 4): a fast training step.
MINI = custom("mini", 6, [((0, 1), (), "start"), ((2, 5), (0, 1), "plan"), ((3, 4), (0, 1, 2, 5), "populate")],
              handoff={"terminal": (4, 5)}, start_frames=2)  # fmt: skip


class TritonReached(AssertionError):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """Every tensor claims to be on CUDA (so ``auto`` dispatch picks Triton), and every Triton launcher of
    `mmpl_fast.kernels` raises `TritonReached` instead of running. Returns the names of launchers reached."""
    reached: list[str] = []
    for info in pkgutil.iter_modules(mmpl_fast.kernels.__path__):
        mod = importlib.import_module(f"mmpl_fast.kernels.{info.name}")
        for name, fn in list(vars(mod).items()):
            if name.endswith("_triton") and callable(fn) and getattr(fn, "__module__", None) == mod.__name__:

                def stub(*args, _name=name, **kwargs):
                    reached.append(_name)
                    raise TritonReached(f"{_name} was called")

                monkeypatch.setattr(mod, name, stub)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    return reached


def test_training_takes_the_torch_path_when_tensors_are_on_cuda(fake_cuda):
    model = CausalWanModel("tiny").train()
    cfg = model.config
    n = MINI.num_frames
    x0, noise = torch.randn(2, n, cfg.in_channels, 2, 2), torch.randn(2, n, cfg.in_channels, 2, 2)
    timesteps, sigmas = train.sample_timesteps(MINI, 2, torch.Generator().manual_seed(0))
    # Control: an inference call of the same model on "CUDA" tensors dispatches to Triton.
    with pytest.raises(TritonReached), torch.no_grad():
        pool = KVPool.for_model(model, 1, cfg.tokens_per_frame(2, 2))
        cross = model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim))
        model(x0[:1, :1], torch.zeros(1, 1), cross, pool.view([0], [[0]]))
    assert fake_cuda, "the fake did not make dispatch pick Triton"
    fake_cuda.clear()
    # Training (what `Trainer.loss` calls) sees the same decision but runs the torch references, with gradients.
    cross = model.embed_context(torch.randn(2, cfg.text_len, cfg.text_dim))
    train.teacher_forcing_loss(model, MINI, x0, noise, timesteps, sigmas, cross).backward()
    assert fake_cuda == []
    q = model.blocks[0].self_attn.q.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
