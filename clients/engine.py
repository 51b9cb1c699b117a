"""What every scoring engine is to `deqguard score`: the `Engine` protocol and its `EngineInfo`.

The engines (`local`, `ray`, `http`) build `EngineInfo` and `score.py` chooses among them, so
these types live here, importing neither side: `score.py` imports the engines, the engines import
this module, and no import runs back. No torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .files import Item
from .rows import Row


@dataclass
class EngineInfo:
    """What a run needs to know about the model: class names for labels, the sha for rows."""

    classes: list[str]
    sha256: str
    name: str = ""
    input: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """`run` yields row chunks in the order of `items`; `close` frees workers or connections."""

    def info(self) -> EngineInfo: ...

    def run(self, items: list[Item]) -> Iterator[list[Row]]: ...

    def close(self) -> None: ...
