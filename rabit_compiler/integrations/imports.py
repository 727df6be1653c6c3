"""Integrations that load with the library they integrate: ``after_import("peft.tuners.lora.layer",
"rabit_compiler.integrations.peft")`` imports the integration right after that module's code has run (at once if it
already has).

``import rabit_compiler`` must not import PEFT (about 5 s on a 2-core CPU) in processes that never use it, yet a user
who does should not have to wire anything. A finder at the front of ``sys.meta_path`` finds nothing itself: for a
watched name it takes the spec the other finders give and makes its loader import the integration after the module's
own code. Probes that only look for a module (``importlib.util.find_spec``, as transformers does for peft) run no
integration: it is imported once, after the real import. Watch the module that defines what the integration needs,
not the package's ``__init__``: rabit_compiler can itself be imported while that ``__init__`` is still running
(peft imports transformers, which probes for a ``kernels`` package: in a checkout, ours).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _AfterImport(importlib.abc.MetaPathFinder):
    """Watches module names; ``integrations[name]`` are the module names to import after ``name`` loads."""

    def __init__(self) -> None:
        self.integrations: dict[str, list[str]] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.integrations:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *_: None)(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_integrate(module: ModuleType) -> None:
            exec_module(module)
            for integration in self.integrations.pop(fullname, []):
                importlib.import_module(integration)

        spec.loader.exec_module = exec_then_integrate
        return spec


_WATCHER = _AfterImport()


def after_import(module: str, integration: str) -> None:
    """Import the module ``integration`` once ``module`` has been imported (now, if it already is)."""
    if module in sys.modules:
        importlib.import_module(integration)
        return
    _WATCHER.integrations.setdefault(module, []).append(integration)
    if _WATCHER not in sys.meta_path:
        sys.meta_path.insert(0, _WATCHER)
