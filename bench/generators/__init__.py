"""Reference generators by string name, and the import of a user's own generator output.

A generator learns from real training images (uint8 `[N, C, S, S]`, class indices) and samples new images per
class. `generate(...)` (in `bench.generators.pipeline`) wraps any registered generator into the command-line
contract: PNG images + a synthetic manifest + the exact training manifest + a generator card, written atomically.
The interface and the registry live in `bench.generators.base`; this module re-exports them.
"""

from __future__ import annotations

from bench.generators.base import (
    CHECK_KINDS,
    GENERATORS,
    TASK_KINDS,
    Control,
    ControlCheck,
    Generator,
    control_of,
    get_generator,
    list_controls,
    list_generators,
    register_generator,
)
from bench.generators.importer import import_synthetic
from bench.generators.pipeline import generate

__all__ = [
    "CHECK_KINDS",
    "GENERATORS",
    "TASK_KINDS",
    "Control",
    "ControlCheck",
    "Generator",
    "control_of",
    "list_controls",
    "register_generator",
    "list_generators",
    "get_generator",
    "generate",
    "import_synthetic",
]
