"""hybrid_ep: expert-parallel dispatch and combine for Mixture-of-Experts on NVIDIA GPUs.

`import hybrid_ep as deep_ep` gives DeepEP v1's `Buffer`, `Config` and `EventOverlap`, and NVIDIA Hybrid-EP's
`HybridEPBuffer` (built on `Buffer`).
"""

# DeepEP exposes the dtype of top-k indices as `deep_ep.topk_idx_t`.
import torch as _torch

from . import reference, topology
from ._ext import build_info, has_extension
from .buffer import Buffer
from .config import Config
from .event import EventHandle, EventOverlap
from .hybrid_ep_buffer import HybridEPBuffer, HybridEpConfigInstance, HybridEPHandle
from .version import __version__

topk_idx_t = _torch.int64

__all__ = [
    "Buffer",
    "Config",
    "EventHandle",
    "EventOverlap",
    "HybridEPBuffer",
    "HybridEPHandle",
    "HybridEpConfigInstance",
    "__version__",
    "build_info",
    "has_extension",
    "reference",
    "topk_idx_t",
    "topology",
]
