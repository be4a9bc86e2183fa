"""The GSON envelope: a JSON array of ``{"fully.qualified.ClassName": {...}}`` objects.

:func:`load_commands` and :func:`load_answers` read an envelope (already parsed from
JSON) into typed values; :func:`dump` writes any sequence of them back. Every problem is
reported at once, each as a :class:`Problem` naming where it is by JSON pointer
(``/0/org.apache.cloudstack.backup.TakeBackupCommand/vmName``) and what it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from marshmallow import Schema, ValidationError

from commands import model
from commands.schemas import ANSWER_SCHEMAS, COMMAND_SCHEMAS, JavaSchema
from commands.wrappers import DEFAULT_GENERATION, Generation, infer_generation
from shim.compat import strict_zip

_SCHEMA_LEVEL = "_schema"

T = TypeVar("T", bound=model.Message)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an envelope: where (a JSON pointer) and what."""

    field: str
    message: str


class EnvelopeError(ValueError):
    """An envelope that cannot be loaded; :attr:`problems` says every reason."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(f"{p.field or '/'}: {p.message}" for p in problems))
        self.problems = list(problems)


def _pointer(*parts: object) -> str:
    # RFC 6901: "~" and "/" inside a reference token are escaped.
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _flatten(messages: Any, at: tuple[object, ...]) -> list[Problem]:
    if isinstance(messages, Mapping):
        problems = []
        for key, value in messages.items():
            where = at if key == _SCHEMA_LEVEL else (*at, key)
            problems += _flatten(value, where)
        return problems
    if isinstance(messages, (list, tuple)):
        return [p for item in messages for p in _flatten(item, at)]
    return [Problem(_pointer(*at), str(messages))]


def _load(data: Any, schemas: Mapping[str, type[JavaSchema]], kind: str) -> list[Any]:
    if not isinstance(data, list):
        raise EnvelopeError(
            [Problem("", f"an envelope is a JSON array of {{class name: {kind}}} objects")]
        )
    if not data:
        raise EnvelopeError([Problem("", f"the envelope holds no {kind}")])
    loaded: list[Any] = []
    problems: list[Problem] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(
                Problem(_pointer(index), f"must be an object with exactly one key: a {kind} class")
            )
            continue
        ((class_name, body),) = item.items()
        schema = schemas.get(class_name)
        if schema is None:
            problems.append(Problem(_pointer(index, class_name), f"unknown {kind} class"))
            continue
        try:
            loaded.append(schema().load(body))
        except ValidationError as exc:
            problems += _flatten(exc.messages, (index, class_name))
    if problems:
        raise EnvelopeError(problems)
    return loaded


def load_commands(
    data: Any,
    *,
    generation: Generation | None = None,
    default: Generation = DEFAULT_GENERATION,
) -> list[model.Command]:
    """The commands of an envelope, in order; raise EnvelopeError naming every problem.

    Each command belongs to ``generation`` when the caller says so; else to the one
    generation that sends a field it carries (``parentPath``: the seed); else to
    ``default``. A field that contradicts the stated generation is a problem.
    """
    commands = _load(data, COMMAND_SCHEMAS, "command")
    problems = []
    typed = []
    for index, (item, command) in enumerate(strict_zip(data, commands)):
        ((class_name, body),) = item.items()
        inferred = infer_generation([str(key) for key in body])
        if generation is not None and inferred is not None and inferred != generation:
            problems.append(
                Problem(
                    _pointer(index, class_name),
                    f"carries a field of the {inferred.value} generation, not {generation.value}",
                )
            )
        typed.append(replace(command, generation=generation or inferred or default))
    if problems:
        raise EnvelopeError(problems)
    return typed


def load_answers(data: Any) -> list[model.Answer]:
    """The answers of an envelope, in order; raise EnvelopeError naming every problem."""
    return _load(data, ANSWER_SCHEMAS, "answer")


def schema_for(value: model.Message) -> Schema:
    """The schema that writes ``value``."""
    schemas: Mapping[str, type[JavaSchema]] = {**COMMAND_SCHEMAS, **ANSWER_SCHEMAS}
    return schemas[value.JAVA_CLASS]()


def dump(values: Sequence[model.Message]) -> list[dict[str, Any]]:
    """The envelope of ``values``: GSON's wire form, nulls omitted."""
    return [{value.JAVA_CLASS: schema_for(value).dump(value)} for value in values]
