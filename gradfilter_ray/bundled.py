"""`bundled:NAME`: the tiny models, tokenizer and data shipped inside the package (gradfilter_ray/assets/README.md
lists their sources and licences), so the demo and the tests run offline. No torch here: the data stage resolves
its input path with it, and its driver should not pay torch's import (~180 MiB) for that."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUNDLED_PREFIX = "bundled:"
BUNDLED = {
    "stories260K": ASSETS / "models" / "stories260K",
    "gpt2": ASSETS / "tokenizers" / "gpt2",
    "alpaca_sample_1k.json": ASSETS / "data" / "alpaca_sample_1k.json",
    "alpaca_5k.json": ASSETS / "data" / "alpaca_5k.json",
    "glaive_toolcall_en_demo.json": ASSETS / "data" / "glaive_toolcall_en_demo.json",
}


def resolve(path: str) -> str:
    """Map 'bundled:NAME' to the packaged file or folder; anything else passes through."""
    if not path.startswith(BUNDLED_PREFIX):
        return path
    name = path[len(BUNDLED_PREFIX) :]
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled asset {name!r}; bundled: {sorted(BUNDLED)}")
    return str(BUNDLED[name])
