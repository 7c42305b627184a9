"""An index's metadata schema: the type of each metadata key, so a write or a filter of the wrong type is
refused instead of silently missing. A key's type is declared when the index is built, or else set by the
first value written under it; a write or filter that contradicts it is INVALID_ARGUMENT naming the
document (or clause) and the key. Values are converted only when the recall server's
``metadata_coerce`` setting allows it, and then only where the conversion loses nothing."""

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal

from twostage import errors
from twostage.corpus import Document, MetadataValue
from twostage.filters import Filter

TYPES = ("string", "number", "bool", "string_list")
_ARTICLE = {"string": "a string", "number": "a number", "bool": "a boolean", "string_list": "a list of strings"}
_PLURAL = {"string": "strings", "number": "numbers", "bool": "booleans", "string_list": "lists of strings"}

Schema = dict[str, str]


def type_of(value: MetadataValue) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "string_list"
    return "string"


def check_declared(schema: Mapping[str, str]) -> Schema:
    """A schema as a user declares it (``index build --metadata-schema``)."""
    from twostage.documents import METADATA_KEY_PATTERN

    for key, kind in schema.items():
        if not METADATA_KEY_PATTERN.match(key):
            raise errors.InvalidArgument(f"metadata schema: key {key[:40]!r} must be 1-128 letters, digits or _.:-")
        if kind not in TYPES:
            raise errors.InvalidArgument(f"metadata schema: {key!r} has type {kind!r}; use one of {', '.join(TYPES)}")
    return dict(schema)


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_JSON_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
MAX_EXACT_INTEGER = 2**53  # filters compare numbers as doubles: larger integers would compare inexactly


def _coerced(value: MetadataValue, wanted: str) -> MetadataValue | None:
    """The value as the wanted type when that loses nothing; None when it cannot be."""
    if wanted == "number" and isinstance(value, str):
        # JSON's own number syntax only: no "0012", "1_000", "١٢" (int() and float() take all three).
        if _JSON_NUMBER.fullmatch(value) is None:
            return None
        if _JSON_INTEGER.fullmatch(value):
            whole = int(value)
            return whole if abs(whole) <= MAX_EXACT_INTEGER else None
        number = float(value)
        # The stored double must read back as the same decimal: "12.999999999999999999" would become 13.0.
        return number if math.isfinite(number) and Decimal(repr(number)) == Decimal(value) else None
    if wanted == "bool" and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if wanted == "string" and type_of(value) == "number":
        return str(value)
    if wanted == "string_list" and isinstance(value, str):
        return [value]
    return None


def _show(value: MetadataValue) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def conform(docs: list[Document], schema: Mapping[str, str], coerce: bool = False,
            hint: bool = True, holder: str = "this index holds") -> tuple[list[Document], Schema]:
    """The documents of one write checked against the schema, keys new to it typed by their first value in the
    request; returns them (converted where ``coerce`` allows) and the keys they add."""
    known, added = dict(schema), {}
    conformed = []
    for i, doc in enumerate(docs):
        metadata = doc.metadata
        for key, value in doc.metadata.items():
            kind = type_of(value)
            wanted = known.get(key)
            if wanted is None:
                known[key] = added[key] = kind
                continue
            if kind == wanted:
                continue
            converted = _coerced(value, wanted) if coerce else None
            if converted is None:
                how = "; the recall server's --metadata-coerce converts values that lose nothing" if (
                    hint and not coerce) else ""
                raise errors.InvalidArgument(
                    f"documents[{i}]: document {doc.id!r} metadata {key!r} is {_ARTICLE[kind]} ({_show(value)}), "
                    f"but {holder} {_PLURAL[wanted]} under {key!r}{how}")
            metadata = {**metadata, key: converted}
        conformed.append(doc if metadata is doc.metadata else replace(doc, metadata=metadata))
    return conformed, added


def _fits(value, wanted: str) -> bool:
    kind = type_of(value)
    # A list of strings is matched by one of its strings.
    return kind == wanted or (wanted == "string_list" and kind == "string")


def check_filter_types(filter_: Filter | None, schema: Mapping[str, str]) -> None:
    """Every clause compares a key with values of its type (a key no document has yet is not checked)."""
    if filter_ is None:
        return
    for i, clause in enumerate(filter_.clauses):
        wanted = schema.get(clause.key)
        if wanted is None:
            continue
        where = f"filter clause {i} (key {clause.key!r})"
        if clause.range is not None:
            if wanted != "number":
                raise errors.InvalidArgument(f"{where}: a range compares numbers, but this index holds "
                                             f"{_PLURAL[wanted]} under {clause.key!r}")
            continue
        for value in (clause.equals,) if clause.any_of is None else clause.any_of:
            if not _fits(value, wanted):
                raise errors.InvalidArgument(
                    f"{where}: {_show(value)} is {_ARTICLE[type_of(value)]}, but this index holds "
                    f"{_PLURAL[wanted]} under {clause.key!r}, so it could match nothing")
