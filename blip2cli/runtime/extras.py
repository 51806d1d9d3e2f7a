"""The optional parts of the install (``pip install 'blip2[EXTRA]'``) and the one-line hint when one is missing.

The base install generates, evaluates and converts. Training, data preparation and the run loggers add
libraries that weigh gigabytes or pull services in, so each comes with its extra; a command that needs one
checks for it before it starts any work.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import Blip2Error

# extra -> the modules it provides, as imported (the pip names are in pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("deepspeed", "webdataset"),
    "data": ("img2dataset", "webdataset", "pyarrow"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
}


def hint(extra: str, purpose: str, missing: str) -> Blip2Error:
    """The one-line error for ``purpose`` when ``missing`` (a module of ``extra``) is not installed."""
    return Blip2Error(f"{purpose} needs {missing}, which is not installed: pip install 'blip2[{extra}]'")


def require_extra(extra: str, purpose: str) -> None:
    """Refuse ``purpose`` in one line unless every module of ``extra`` is installed (found, not imported)."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise hint(extra, purpose, module)


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module`` (a module of ``extra``), or the one-line hint naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there, something it imports is not: a broken install, shown as it is
        raise hint(extra, purpose, module.split(".")[0]) from None
