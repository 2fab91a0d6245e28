"""Fast greedy decoding: a dense transformers prefill, then a lean decode step with a static KV cache and CUDA graphs."""

from .decoder import COMPILE_MODES, MODES, FastDecoder
from .lean import SUPPORTED_MODEL_TYPES, LeanDecoder, architecture_problem

__all__ = ["COMPILE_MODES", "MODES", "SUPPORTED_MODEL_TYPES", "FastDecoder", "LeanDecoder", "architecture_problem"]
