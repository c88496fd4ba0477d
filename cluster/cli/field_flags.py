"""Command-line flags generated from a pydantic model's fields: one flag per field, of the field's name.

    max_num_seqs: int = 64  + its attribute docstring  ->  --max-num-seqs INT   "<docstring> (default: 64)"

Types: int, float, str; Literal[...] -> choices; `int | Literal["auto"]` -> either; `X | None` -> X (None
stays the field's default); bool -> `--x` / `--no-x`. A flag left off never reaches the model
(`field_values`), so every default is the field's own, declared once. A field marked
`json_schema_extra={"cli": False}` (a secret: a value on a command line shows in `ps`) gets no flag;
`not_flags_epilog` names it with its docstring, which says how to give it instead.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

METAVARS: dict[type, str] = {int: "INT", float: "FLOAT", str: "TEXT"}
"""The value types a flag takes, as --help shows them."""


def flag_name(field_name: str) -> str:
    """`max_num_seqs` -> `--max-num-seqs`."""
    return "--" + field_name.replace("_", "-")


def is_flag(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return not (isinstance(extra, Mapping) and extra.get("cli") is False)


def shown_default(value: object) -> str:
    """A default as --help prints it: as typed on a command line, '' for an empty text."""
    return "''" if value == "" else str(value)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (`X | Y`, Optional[X]) without None; [annotation] for anything else."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _choices_or_value(name: str, literals: list[Any], scalar: type) -> Callable[[str], Any]:
    """A parser for `scalar | Literal[...]`: one of the literals as written, else a `scalar`."""
    by_text = {str(v): v for v in literals}

    def parse(text: str) -> Any:
        if text in by_text:
            return by_text[text]
        try:
            return scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(map(repr, by_text))} or "
                                             f"{METAVARS[scalar].lower()}, got {text!r}") from None
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _value_kwargs(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse.add_argument keywords for the field's value type (its annotation)."""
    members = _members(field.annotation)
    literal_members = [m for m in members if typing.get_origin(m) is Literal]
    literals = [v for m in literal_members for v in typing.get_args(m)]
    scalars = [m for m in members if m in METAVARS]
    if members == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    if literals and not scalars and all(isinstance(v, str) for v in literals):
        return {"choices": literals}
    if len(scalars) == 1 and len(scalars) + len(literal_members) == len(members):
        if not literals:
            return {"type": scalars[0], "metavar": METAVARS[scalars[0]]}
        return {"type": _choices_or_value(name, literals, scalars[0]),
                "metavar": "{" + ",".join(map(str, literals)) + f",{METAVARS[scalars[0]]}" + "}"}
    raise TypeError(f"field {name}: {field.annotation} has no flag form (int, float, str, bool, Literal, "
                    f"one of these | Literal, | None); give it one of those types or mark it "
                    f"json_schema_extra={{'cli': False}}")


def _help(name: str, field: FieldInfo, default: object) -> str:
    if not field.description:
        raise TypeError(f"field {name} has no docstring: its --help would be empty; document it beneath the field")
    text = " ".join(field.description.split()).replace("%", "%%")  # argparse formats help with %
    return f"{text} (default: {shown_default(default).replace('%', '%%')})"


def add_field_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                    defaults: Mapping[str, object] | None = None) -> None:
    """One flag per field of `model` (but those marked not to be flags). `defaults`: a command's own
    default for a field the model requires (`up`'s `--model tiny`); it is shown and always passed on."""
    defaults = defaults or {}
    for name, field in model.model_fields.items():
        if not is_flag(field):
            continue
        if name in defaults:
            shown, default = defaults[name], defaults[name]
        elif field.is_required():
            raise TypeError(f"field {name} is required and has no command default; pass one in `defaults`")
        else:
            shown, default = field.get_default(call_default_factory=True), argparse.SUPPRESS
        parser.add_argument(flag_name(name), dest=name, default=default, help=_help(name, field, shown),
                            **_value_kwargs(name, field))


def field_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields given on the command line (or by a command default), by field name."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def not_flags_epilog(model: type[BaseModel]) -> str:
    """What --help says of the fields that are not flags: each one's name and docstring."""
    lines = [f"{name} (not a flag): {' '.join((field.description or '').split())}"
             for name, field in model.model_fields.items() if not is_flag(field)]
    return "\n".join(lines).replace("%", "%%")
