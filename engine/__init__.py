"""nibble's engine: everything between a token list and a token list."""

from engine.config import EngineConfig, QuantPolicy, QuantSpec
from engine.errors import NibbleError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig",
           "QuantPolicy", "QuantSpec", "NibbleError"]
