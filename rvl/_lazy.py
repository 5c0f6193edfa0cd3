"""PEP 562 lazy attributes shared by ``rvl``, ``rvl.data``, ``rvl.nlp`` and ``rvl.retrieval``.

Each package lists ``public name -> defining module``; the module is imported on first access, so importing a package
never pulls in torch / open_clip / faiss / datasets until a name that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, table: dict[str, str], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build the module-level ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: The package's ``__name__``.
        table: Public name -> absolute or package-relative (leading ".") module name that defines it.
        namespace: The package's ``globals()``; resolved values are cached there.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
