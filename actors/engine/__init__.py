"""Generation engines behind one interface (DESIGN.md section 4): `native` (ours) and `vllm` (optional)."""
from .native import NativeEngine
from .sampling import SamplingParams
from .types import Completion, Engine, keep_mask_tensor

__all__ = ["NativeEngine", "SamplingParams", "Completion", "Engine", "keep_mask_tensor"]
