"""Finding the variant modules of a seam (evaluation backends, stage launchers) by name.

A variant is a module of the seam's package that exports its class under an agreed attribute (`BACKEND`,
`LAUNCHER`); its name is the module's name. Adding one is adding the module: nothing is registered by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from .errors import QllmConfigError


def names(package: ModuleType) -> list[str]:
    """The variants a package holds: its public modules."""
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load(package: ModuleType, name: str, attribute: str, what: str) -> Any:
    """An instance of the class `attribute` of module `<package>.<name>`, or a QllmConfigError listing the valid
    names (`what` says what is being looked up, e.g. "evaluation backend")."""
    valid = names(package)
    if name not in valid:
        raise QllmConfigError(f"unknown {what} '{name}'; valid: {', '.join(valid)}")
    return getattr(importlib.import_module(f"{package.__name__}.{name}"), attribute)()
