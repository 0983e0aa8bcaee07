"""Optional dependencies of the ``sdar`` commands and the pip extra that brings each.

``pip install sdar-engine`` is the kernels alone (torch); the trainer, the envs and the benchmarks
come with extras (setup.py). Each command checks the imports it will need before it does any work,
so a missing package stops it at once with the install line instead of minutes into a run.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

# extra -> top-level import names it provides (the distribution names differ: pyyaml -> yaml)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "engine": ("numpy", "transformers", "tokenizers", "safetensors", "yaml", "tqdm"),
    "envs": ("bm25s", "rapidfuzz", "alfworld", "textworld"),
    "bench": ("matplotlib", "pytest"),
}
# sdar subcommand -> extras it needs, checked in this order (the first one missing is named)
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("engine",),
    "eval": ("engine",),
    "study": ("engine",),
    "demo": ("engine", "envs"),  # the demo plays offline ALFWorld
    "bench": ("engine", "bench"),  # the trainer suite builds a tiny transformers model
}


def missing_modules(extra: str) -> list[str]:
    """Import names of ``extra`` that cannot be found (found, not imported: this is cheap)."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"extra={extra!r} is unknown; valid: {', '.join(EXTRA_MODULES)}")
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def missing_extra_message(command: str) -> Optional[str]:
    """One line naming what ``sdar <command>`` lacks and the pip extra that brings it, or None.

    e.g. "sdar bench needs matplotlib: pip install 'sdar-engine[bench]'".
    """
    for extra in COMMAND_EXTRAS.get(command, ()):
        gone = missing_modules(extra)
        if gone:
            return f"sdar {command} needs {', '.join(gone)}: pip install 'sdar-engine[{extra}]'"
    return None
