"""One press a file; importing a module registers its press by name."""
from . import ems, gear, h2o, kivi, knorm, kvquant, quest, rotatekv, scope, snapkv, streaming_llm, tidal  # noqa: F401
