"""Inductor options for every compile lancet makes, from the ``LANCET_INDUCTOR_OPTIONS`` environment variable.

The value is a JSON object of Inductor config keys, e.g.
``LANCET_INDUCTOR_OPTIONS='{"triton.enable_pdl": true, "combo_kernels": true}'``. It reaches the
compiled regions of the ``compiled`` and ``cudagraph`` executors and the bench's ``eager-compiled``
baseline alike (``torch.compile(..., options=...)``), so a comparison stays like for like. An
environment variable rather than a flag: the ranks are separate processes and inherit it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

ENV = "LANCET_INDUCTOR_OPTIONS"


def inductor_options(environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The options ``ENV`` names (None when unset or empty); unknown keys and bad JSON raise ``ValueError``."""
    text = environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ENV} is not JSON ({err}): {text!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV} must be a JSON object of Inductor options, got {text!r}")
    from torch._inductor import config

    known = config.get_config_copy()
    unknown = sorted(key for key in options if key not in known)
    if unknown:
        raise ValueError(f"{ENV}: unknown Inductor option(s) {', '.join(unknown)} (see torch._inductor.config)")
    return options or None


def compile_options(backend: str) -> dict[str, Any]:
    """Keyword arguments for ``torch.compile`` that carry ``ENV``'s options (only the Inductor backend takes them)."""
    options = inductor_options()
    if options is None:
        return {}
    if backend != "inductor":
        raise ValueError(f"{ENV} is set but the compile backend is {backend!r}; only inductor takes options")
    return {"options": options}
