"""The one fault-injection seam: stages call `fault_point(name, **context)` at the points where a real run can be
interrupted (a worker after a checkpoint, an actor between batches). Production code never branches on it: with no
handler configured it returns at once. Tests set GFR_FAULT_HANDLER=module:function (and their own GFR_FAULT_*
variables) in the driver's environment; `fault_env()` hands them to every Ray worker, whose first `fault_point`
imports the handler and calls it as `handler(name, **context)`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

HANDLER_ENV = "GFR_FAULT_HANDLER"
ENV_PREFIX = "GFR_FAULT"

_handler: Callable[..., None] | None = None
_loaded = False


def fault_env() -> dict[str, str]:
    """The variables a worker needs to run the configured handler (empty when none is configured)."""
    if not os.environ.get(HANDLER_ENV):
        return {}
    names = [k for k in os.environ if k.startswith(ENV_PREFIX)] + (
        ["PYTHONPATH"] if "PYTHONPATH" in os.environ else []
    )
    return {k: os.environ[k] for k in names}


def _load() -> Callable[..., None] | None:
    spec = os.environ.get(HANDLER_ENV)
    if not spec:
        return None
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def fault_point(name: str, **context) -> None:
    global _handler, _loaded
    if not _loaded:
        _handler, _loaded = _load(), True
    if _handler is not None:
        _handler(name, **context)
