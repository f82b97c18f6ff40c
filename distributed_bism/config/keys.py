"""Every config key with its type, default and one line of meaning, read from the dataclasses.

Key, type and default come from `dataclasses.fields` and `typing.get_type_hints` (the type that
loading.coerce enforces). The meaning is the field's own comment in schema.py / run_schema.py,
read from the source with `tokenize`, so the listing cannot drift from the code that defines it:
a field's trailing comment (on any line of its statement), or, when it has none, the block of
comment lines directly above it, joined into one line. A field with neither has no help line,
which tests/unit/test_cli_config.py refuses.

A LEAF, as the rest of config/: stdlib and yaml only.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from distributed_bism.config.schema import Config


@dataclass(frozen=True)
class KeyDoc:
    """One config key: `section.field`, its type as written for a user, its default, its meaning."""

    key: str
    type: str
    default: Any
    help: str

    @property
    def default_text(self) -> str:
        """The default as one line of YAML, as an override `key=value` would write it."""
        return yaml_inline(self.default)


def yaml_inline(value: Any) -> str:
    """`value` as one line of flow-style YAML: null, true, 0.001, [256, 256], {}."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.removesuffix("...\n").strip()  # a scalar document ends with an explicit "..."


def type_name(tp: Any) -> str:
    """`int`, `str | None`, `list[int]`, `dict[str, float]`: the annotation as it reads in the source."""
    return tp.__name__ if isinstance(tp, type) and typing.get_origin(tp) is None else str(tp)


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """{field name: its one-line help} of dataclass `cls`, from its source comments ("" when the
    field has no comment)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef), f"{cls.__name__}: source is not a class"
    out: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        text = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
        if not text:  # the comment block right above the field
            n = node.lineno - 1
            while n >= 1 and lines[n - 1].lstrip().startswith("#"):
                text.insert(0, comments[n])
                n -= 1
        out[node.target.id] = " ".join(t for t in text if t)
    return out


def config_keys(root: type = Config) -> list[KeyDoc]:
    """Every `section.field` of `root` (a dataclass of section dataclasses), in definition order."""
    keys = []
    for section in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[section.name]
        hints, helps = typing.get_type_hints(cls), field_help(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            keys.append(KeyDoc(f"{section.name}.{f.name}", type_name(hints[f.name]), default, helps[f.name]))
    return keys
