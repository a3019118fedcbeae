"""A subcommand's flags from its config dataclass: one flag per field, as litgpt and jsonargparse build them.

The flag is the field's name with dashes (``max_sentences`` -> ``--max-sentences``); its type, choices
(a ``Literal``) and default come from the field, its help from the field's docstring. A boolean field
that defaults to false is switched on by ``--name``, one that defaults to true off by ``--no-name``. A list
field takes one comma-separated value (``--apps tagging,llm``), a mapping ``KEY=VALUE`` words
(``--models a=URI b=URI``). Every flag defaults to ``None`` (not given), so ``load_config`` lets the config
file and ``key=value`` overrides stand unless the flag is given; ``flag_values`` collects what was.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Iterable, Literal

SCALARS = (str, int, float)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), base classes first."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for field, doc in zip(body, body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                docs[field.target.id] = " ".join(inspect.cleandoc(doc.value.value).split())
    return docs


def _scalar(tp: Any) -> tuple[type | None, list | None]:
    """(argparse type, choices) of a field type; ``(None, None)`` for one a flag cannot take (lists, dicts)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _scalar(args[0])
    if typing.get_origin(tp) is Literal:
        return type(args[0]), list(args)
    if tp in SCALARS or tp is bool:
        return tp, None
    return None, None


def _collection(tp: Any) -> str | None:
    """``"list"`` for a list of scalars, ``"dict"`` for a mapping to scalars, else ``None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _collection(args[0])
    if typing.get_origin(tp) in (list, tuple) and args and _scalar(args[0])[0] is not None:
        return "list"
    if typing.get_origin(tp) is dict and len(args) == 2 and _scalar(args[1])[0] is not None:
        return "dict"
    return None


def _inner_scalar(tp: Any) -> type:
    """The element type of a list field (``list[int] | None`` -> ``int``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _inner_scalar(args[0])
    return _scalar(args[0])[0]


def _comma_list(kind: type):
    def comma_list(text: str) -> list:
        return [kind(v) for v in text.split(",") if v]

    comma_list.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in its error
    return comma_list


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _help(doc: str, default: Any) -> str:
    text = doc.replace("%", "%%").replace("``", "")
    if default is None or default is dataclasses.MISSING or isinstance(default, bool) or default in ([], {}):
        return text
    if isinstance(default, (list, tuple)):
        default = ",".join(str(v) for v in default)
    return f"{text} (default: {default})"


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type, fields: Iterable[str] | None = None, *,
                     flag_names: dict[str, str] | None = None) -> list[str]:
    """Add a flag for each of ``fields`` of dataclass ``cls`` (default: every field a flag can take);
    ``flag_names`` renames a flag (``{"output_dir": "--output"}``). Returns the fields given flags."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    added = []
    for name in (list(fields) if fields is not None else list(by_name)):
        field = by_name[name]
        kind, choices = _scalar(hints[name])
        collection = None if kind else _collection(hints[name])
        if kind is None and collection is None:
            if fields is not None:
                raise TypeError(f"{cls.__name__}.{name}: a flag cannot take {hints[name]}")
            continue
        flag = (flag_names or {}).get(name, "--" + name.replace("_", "-"))
        default = _default(field)
        if collection == "list":
            parser.add_argument(flag, dest=name, type=_comma_list(_inner_scalar(hints[name])), default=None,
                                metavar="A,B", help=_help(docs.get(name, "") + " Comma-separated.", default))
        elif collection == "dict":
            parser.add_argument(flag, dest=name, nargs="*", default=None, metavar="KEY=VALUE",
                                help=_help(docs.get(name, ""), default))
        elif kind is bool and default is True:
            parser.add_argument((flag_names or {}).get(name, "--no-" + name.replace("_", "-")), dest=name,
                                action="store_const", const=False, default=None,
                                help=f"{name}=false; {name}: " + _help(docs.get(name, ""), None))
        elif kind is bool:
            parser.add_argument(flag, dest=name, action="store_const", const=True, default=None,
                                help=_help(docs.get(name, ""), None))
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None,
                                help=_help(docs.get(name, ""), default))
        added.append(name)
    return added


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, what: str, *, required: bool = False,
                         overrides: str | None = None) -> None:
    """``--config FILE`` and the ``key=value`` overrides every subcommand takes (``overrides``: what they
    name, when more than ``cls``'s fields)."""
    parser.add_argument("--config", required=required, help=f"YAML of {cls.__name__} fields ({what})")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides of {overrides or cls.__name__ + ' fields'}")


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` set by flags (``None``: not given), for ``load_config``'s keyword extras; a
    mapping's ``KEY=VALUE`` words as a dict."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is not None and _collection(hints[f.name]) == "dict":
            value = _pairs(f.name, value)
        values[f.name] = value
    return values


def _pairs(name: str, words: list[str]) -> dict[str, str] | None:
    from topro.config import ConfigError

    pairs = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--{name.replace('_', '-')} {word!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs or None  # a bare flag leaves the file's mapping
