"""The error hierarchy drawn in ``shim.errors``' docstring is the real one."""

from __future__ import annotations

import importlib
import pkgutil
import re

import commands
import shim
from shim import errors


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def _drawn_edges() -> set[tuple[str, str]]:
    """(parent, child) pairs of the tree in the docstring."""
    doc = errors.__doc__ or ""
    tree = doc.split("::", 1)[1]
    edges, stack = set(), []  # stack: (column, name)
    for line in tree.splitlines():
        match = re.search(r"\+-- (\w+)|^\s+(BaseException)$", line)
        if not match:
            continue
        name = match.group(1) or match.group(2)
        column = match.start(1) if match.group(1) else match.start(2)
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            edges.add((stack[-1][1], name))
        stack.append((column, name))
    return edges


def test_the_docstring_draws_every_shim_error() -> None:
    for package in (shim, commands):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    real = {
        (base.__name__, cls.__name__)
        for root in (errors.ShimError, errors.Aborted)
        for cls in _all_subclasses(root)
        for base in cls.__bases__
    } | {("BaseException", "Aborted"), ("BaseException", "Exception"), ("Exception", "ShimError")}
    assert _drawn_edges() == real


def test_an_abort_is_never_a_failure() -> None:
    # No handler of a failure (except ShimError, CommandFailed, Exception) can take a stop
    # for one: the fallback, warning or message it would turn it into never happens.
    from shim.cancel import Cancelled

    for stop in (errors.Aborted, errors.Interrupted, Cancelled):
        assert not issubclass(stop, Exception)
        assert (
            errors.exit_code_for(stop("x") if stop is not Cancelled else Cancelled(["p"], "r")) == 1
        )
    assert not any(issubclass(cls, errors.Aborted) for cls in _all_subclasses(errors.ShimError))
