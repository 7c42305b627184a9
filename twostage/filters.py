"""Metadata filters: a conjunction of typed clauses on metadata keys.

One definition, three uses: checked at the edge (a malformed clause is
INVALID_ARGUMENT naming it), run as SQL by the document store
(recall_server/docstore.py), and evaluated in Python (``matches``), which
states the semantics the SQL must agree with:

- ``equals`` a string, number or boolean: the key holds that value (of that
  type), or holds a list of strings containing it;
- ``any_of``: ``equals`` one of the values;
- ``range``: the key holds a number within every bound given.

A document without the key fails the clause.
"""

import json
import math
import re
from dataclasses import dataclass

from twostage import errors
from twostage.corpus import MetadataValue
from twostage.documents import METADATA_KEY_PATTERN

MAX_CLAUSES = 32
MAX_ANY_OF = 1024

Scalar = str | int | float | bool


# A range's bounds by name, with the comparison each makes (the proto's field names, and SQL's operators).
BOUNDS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
_COMPARE = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}


@dataclass(frozen=True)
class NumberRange:
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None

    def given(self) -> dict[str, float]:
        """The bounds that are set, by name."""
        return {name: getattr(self, name) for name in BOUNDS if getattr(self, name) is not None}

    def holds(self, number: float) -> bool:
        return all(_COMPARE[BOUNDS[name]](float(number), limit) for name, limit in self.given().items())


@dataclass(frozen=True)
class FilterClause:
    key: str
    equals: Scalar | None = None
    any_of: tuple[Scalar, ...] | None = None
    range: NumberRange | None = None

    def matches(self, metadata: dict[str, MetadataValue]) -> bool:
        if self.key not in metadata:
            return False
        value = metadata[self.key]
        if self.range is not None:
            return _is_number(value) and self.range.holds(value)
        wanted = (self.equals,) if self.any_of is None else self.any_of
        if isinstance(value, list):
            return any(isinstance(w, str) and w in value for w in wanted)
        return any(_same(value, w) for w in wanted)


@dataclass(frozen=True)
class Filter:
    clauses: tuple[FilterClause, ...]

    def matches(self, metadata: dict[str, MetadataValue]) -> bool:
        return all(clause.matches(metadata) for clause in self.clauses)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(value, wanted) -> bool:
    if isinstance(wanted, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value == wanted
    if _is_number(wanted):
        return _is_number(value) and value == wanted
    return isinstance(value, str) and value == wanted


def _scalar(value: MetadataValue, where: str) -> Scalar:
    if isinstance(value, list):
        raise errors.InvalidArgument(f"{where}: compare with one string, number or boolean (any_of for several)")
    if not (isinstance(value, str | bool) or _is_number(value)):
        raise errors.InvalidArgument(f"{where}: compare with a string, number or boolean, got {value!r}")
    if _is_number(value) and not math.isfinite(value):
        raise errors.InvalidArgument(f"{where}: the number must be finite")
    return value


def check_filter(clauses: list[FilterClause]) -> Filter | None:
    """Validate clauses built from a request; None when there are none."""
    if not clauses:
        return None
    if len(clauses) > MAX_CLAUSES:
        raise errors.InvalidArgument(f"filter: {len(clauses)} clauses; the limit is {MAX_CLAUSES}")
    checked = []
    for i, clause in enumerate(clauses):
        where = f"filter clause {i} (key {clause.key[:40]!r})"
        if not METADATA_KEY_PATTERN.match(clause.key):
            raise errors.InvalidArgument(f"{where}: the key must be 1-128 letters, digits or _.:-")
        tests = sum(t is not None for t in (clause.equals, clause.any_of, clause.range))
        if tests != 1:
            raise errors.InvalidArgument(f"{where}: set exactly one of equals, any_of, range")
        if clause.equals is not None:
            checked.append(FilterClause(clause.key, equals=_scalar(clause.equals, where)))
        elif clause.any_of is not None:
            if not clause.any_of or len(clause.any_of) > MAX_ANY_OF:
                raise errors.InvalidArgument(f"{where}: any_of needs 1-{MAX_ANY_OF} values")
            checked.append(FilterClause(clause.key, any_of=tuple(_scalar(v, where) for v in clause.any_of)))
        else:
            r = clause.range
            bounds = list(r.given().values())
            if not bounds:
                raise errors.InvalidArgument(f"{where}: range needs at least one of gte, gt, lte, lt")
            if not all(math.isfinite(b) for b in bounds):
                raise errors.InvalidArgument(f"{where}: range bounds must be finite")
            if (r.gte is not None and r.gt is not None) or (r.lte is not None and r.lt is not None):
                raise errors.InvalidArgument(f"{where}: give one lower bound (gte or gt) and one upper (lte or lt)")
            low, high = (r.gte if r.gte is not None else r.gt), (r.lte if r.lte is not None else r.lt)
            if low is not None and high is not None and low > high:
                raise errors.InvalidArgument(f"{where}: the lower bound {low} is above the upper bound {high}")
            checked.append(clause)
    return Filter(tuple(checked))


# The command line's short forms, longest operator first so "<=" is not read as "<".
_SHORT = re.compile(r"^\s*([A-Za-z0-9_.:-]+)\s*(<=|>=|!=|<|>|=|\s+in\s+)\s*(.*?)\s*$", re.IGNORECASE)
_SHORT_RANGE = {"<=": "lte", ">=": "gte", "<": "lt", ">": "gt"}


def _literal(text: str, where: str) -> Scalar:
    """A short-form value: JSON's numbers, true/false and quoted strings; anything else is a bare string."""
    text = text.strip()
    if not text:
        raise errors.InvalidArgument(f"{where}: the value is empty")
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, str | bool) or _is_number(value):
        return value
    return text


_LISTED_VALUE = re.compile(r'\s*("(?:[^"\\]|\\.)*"|[^,"]*?)\s*(,|$)')


def _listed(text: str, where: str) -> list[str]:
    """The values of ``KEY in A,B``, comma-separated; a value with a comma goes in double quotes
    (``"Acme, Inc",Other``) and stays quoted for ``_literal``, so ``"007"`` is a string as in ``KEY="007"``."""
    values, at = [], 0
    while True:
        match = _LISTED_VALUE.match(text, at)
        if match is None:
            raise errors.InvalidArgument(f"{where}: expected comma-separated values, a value with a comma in "
                                         "double quotes")
        values.append(match.group(1))
        at = match.end()
        if match.group(2) != "," or at > len(text):
            break
    if at < len(text):
        raise errors.InvalidArgument(f"{where}: unexpected {text[at:at + 20]!r} after the values")
    return values


def _clause_from_json(key: str, test, where: str) -> FilterClause:
    if isinstance(test, dict):
        if set(test) <= set(BOUNDS) and test:
            if not all(_is_number(v) for v in test.values()):
                raise errors.InvalidArgument(f"{where}: range bounds must be numbers")
            return FilterClause(key, range=NumberRange(**{k: float(v) for k, v in test.items()}))
        if set(test) == {"equals"}:
            return FilterClause(key, equals=test["equals"])
        if set(test) == {"any_of"} and isinstance(test["any_of"], list):
            return FilterClause(key, any_of=tuple(test["any_of"]))
        raise errors.InvalidArgument(
            f"{where}: expected a value, a list (any of), or an object of gte/gt/lte/lt, equals or any_of")
    if isinstance(test, list):
        return FilterClause(key, any_of=tuple(test))
    if test is None:
        raise errors.InvalidArgument(f"{where}: null matches nothing; leave the key out")
    return FilterClause(key, equals=test)


def parse_filter(texts: list[str]) -> Filter | None:
    """Filters as a user types them, each text one or more clauses that must all hold:

    - JSON: ``{"price": {"lte": 100}, "tags": "travel", "category": ["garden", "outdoor"]}``;
    - short forms: ``price<=100``, ``price>5``, ``tags=travel``, ``in_stock=true``, ``category in garden,outdoor``.

    A short-form value is a number, true/false, or a string (quote it, ``code="007"``, to keep digits a string).
    """
    clauses: list[FilterClause] = []
    for text in texts:
        where = f"filter {text[:60]!r}"
        if text.lstrip().startswith("{"):
            try:
                tests = json.loads(text)
            except ValueError as error:
                raise errors.InvalidArgument(f"{where}: not valid JSON ({error})") from None
            if not isinstance(tests, dict) or not tests:
                raise errors.InvalidArgument(f"{where}: expected a JSON object of key: test")
            clauses.extend(_clause_from_json(key, test, where) for key, test in tests.items())
            continue
        match = _SHORT.match(text)
        if match is None:
            raise errors.InvalidArgument(
                f"{where}: expected KEY=VALUE, KEY<=N, KEY>=N, KEY<N, KEY>N, 'KEY in A,B' or a JSON object")
        key, op, value = match.group(1), match.group(2).strip().lower(), match.group(3)
        if op == "!=":
            raise errors.InvalidArgument(f"{where}: filters have no 'not equal'; use 'in' with the values wanted")
        if value.lstrip()[:1] in ("=", "<", ">", "!"):  # price==5, price=>5: a typo, not a string to match
            raise errors.InvalidArgument(f"{where}: the value starts with {value.lstrip()[0]!r}; did you mean "
                                         "one of =, <=, >=, <, >?")
        if op == "in":
            clauses.append(FilterClause(key, any_of=tuple(_literal(v, where) for v in _listed(value, where))))
        elif op == "=":
            clauses.append(FilterClause(key, equals=_literal(value, where)))
        else:
            bound = _literal(value, where)
            if not _is_number(bound):
                raise errors.InvalidArgument(f"{where}: {op} compares with a number, got {value!r}")
            clauses.append(FilterClause(key, range=NumberRange(**{_SHORT_RANGE[op]: float(bound)})))
    return check_filter(clauses)
