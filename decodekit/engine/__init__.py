"""The engine: sequences, a scheduler, a model runner and one step that every caller drives."""
from .api import Engine
from .core import EngineCore, Request
from .sequence import GenerationResult, GenerationStats, Sequence, Status

__all__ = ["Engine", "EngineCore", "Request", "GenerationResult", "GenerationStats", "Sequence", "Status"]
