"""What the oldest supported Python (3.9: EL9's and Debian 11's system Python) lacks.

Everything the shim uses from a newer Python goes through here, so that the day 3.9 is
dropped, this module is the only thing to delete. (The one library difference, aiohttp
3.8's lack of typed application keys on Debian 12, is met where the keys are made:
``shim.service.app``, which the drop-in never imports.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import zip_longest
from typing import Any, TypeVar, overload

_A = TypeVar("_A")
_B = TypeVar("_B")
_C = TypeVar("_C")
_D = TypeVar("_D")
_MISSING = object()


@overload
def strict_zip(a: Iterable[_A], b: Iterable[_B], /) -> Iterator[tuple[_A, _B]]: ...
@overload
def strict_zip(
    a: Iterable[_A], b: Iterable[_B], c: Iterable[_C], /
) -> Iterator[tuple[_A, _B, _C]]: ...
@overload
def strict_zip(
    a: Iterable[_A], b: Iterable[_B], c: Iterable[_C], d: Iterable[_D], /
) -> Iterator[tuple[_A, _B, _C, _D]]: ...
def strict_zip(*iterables: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """``zip(..., strict=True)`` (3.10): pairs items, and raises ValueError when one
    iterable ends before the others, rather than silently dropping the rest."""
    for items in zip_longest(*iterables, fillvalue=_MISSING):
        if any(item is _MISSING for item in items):
            raise ValueError("strict_zip: the iterables are not of the same length")
        yield items
