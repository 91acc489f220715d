"""mmpl_fast.kernels: the hot ops, each a Triton kernel plus its torch reference (the CPU backend).

Every public op dispatches through `_dispatch.resolve`: Triton on CUDA, torch otherwise, unless
``MMPL_FAST_BACKEND`` or `use_backend` forces one.
"""

from ._dispatch import BACKENDS, requested_backend, triton_available, use_backend
from .denoise import cfg_combine, denoise_update, euler_step
from .norm_modulate import gated_residual, norm_modulate
from .page_table import PageTable
from .rope_write import RopeTable, rope_write
from .stage_attention import stage_attention

__all__ = [
    "BACKENDS",
    "PageTable",
    "RopeTable",
    "cfg_combine",
    "denoise_update",
    "euler_step",
    "gated_residual",
    "norm_modulate",
    "requested_backend",
    "rope_write",
    "stage_attention",
    "triton_available",
    "use_backend",
]
