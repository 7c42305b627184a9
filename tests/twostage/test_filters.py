"""Metadata filters: the SQL the store runs agrees with the stated semantics (``Filter.matches``) on
random metadata, and malformed filters are refused naming the clause."""

import random
import re

import numpy as np
import pytest

from recall_server.docstore import DocStore
from twostage import errors
from twostage.convert import filter_from_proto, filter_to_proto
from twostage.corpus import Document
from twostage.filters import FilterClause, NumberRange, check_filter, parse_filter
from twostage.v1 import common_pb2
from twostage.versions import Version

TAGS = ["red", "green", "blue", "amber"]


def random_metadata(rng: random.Random) -> dict:
    metadata = {}
    if rng.random() < 0.8:
        metadata["year"] = rng.choice([rng.randint(1990, 2024), float(rng.randint(1990, 2024)) + 0.5])
    if rng.random() < 0.7:
        metadata["lang"] = rng.choice(["en", "de", "fr", "1", "true"])  # strings that look like other types
    if rng.random() < 0.6:
        metadata["tags"] = rng.sample(TAGS, rng.randint(0, 3))
    if rng.random() < 0.5:
        metadata["open"] = rng.random() < 0.5
    if rng.random() < 0.2:
        metadata["lang"] = rng.choice([1, True])  # the same key with another type elsewhere
    return metadata


def random_clause(rng: random.Random) -> FilterClause:
    kind = rng.choice(["year_eq", "year_range", "lang_eq", "lang_any", "tags_eq", "tags_any", "open", "num_lang"])
    if kind == "year_eq":
        return FilterClause("year", equals=rng.choice([rng.randint(1990, 2024), 2000.5]))
    if kind == "year_range":
        low = rng.randint(1985, 2025)
        high = low + rng.randint(0, 20)
        lower, upper = rng.choice(["gte", "gt", None]), rng.choice(["lte", "lt", None]) or "lte"
        bounds = {lower: low - 0.5 if lower == "gt" else low} if lower else {}
        bounds[upper] = high + 0.5 if upper == "lt" else high
        return FilterClause("year", range=NumberRange(**bounds))
    if kind == "lang_eq":
        return FilterClause("lang", equals=rng.choice(["en", "de", "1", "true"]))
    if kind == "lang_any":
        return FilterClause("lang", any_of=tuple(rng.sample(["en", "de", "fr", "1"], 2)))
    if kind == "tags_eq":
        return FilterClause("tags", equals=rng.choice(TAGS))
    if kind == "tags_any":
        return FilterClause("tags", any_of=tuple(rng.sample(TAGS, 2)))
    if kind == "open":
        return FilterClause("open", equals=rng.random() < 0.5)
    return FilterClause("lang", equals=rng.choice([1, True]))  # typed: never equal to the strings "1", "true"


def test_store_sql_agrees_with_the_stated_semantics(tmp_path):
    rng = random.Random(7)
    store = DocStore(tmp_path / "docs.sqlite")
    docs = [Document(f"d{i}", "", f"text {i}", random_metadata(rng)) for i in range(600)]
    keys = store.upsert(docs, np.zeros((len(docs), 4), np.float32), Version(1, "w")).keys
    store.delete(["d0", "d1"], Version(2, "w"))  # deleted documents never pass
    live = {key: doc for key, doc in zip(keys, docs) if doc.id not in ("d0", "d1")}
    nonempty = 0
    for _ in range(300):
        filter_ = check_filter([random_clause(rng) for _ in range(rng.randint(1, 3))])
        expected = {key for key, doc in live.items() if filter_.matches(doc.metadata)}
        keys = store.matching_keys(filter_)
        assert set(keys) == expected and len(keys) == len(expected), filter_
        assert store.passing(filter_, list(live)) == expected
        nonempty += bool(expected)
    assert nonempty > 100  # the filters were not all trivially empty
    store.close()


def test_a_filter_round_trips_through_its_proto():
    filter_ = check_filter([
        FilterClause("year", range=NumberRange(gte=2000, lt=2010)),
        FilterClause("tags", any_of=("red", "blue")),
        FilterClause("open", equals=True),
        FilterClause("n", equals=3),
    ])
    assert filter_from_proto(filter_to_proto(filter_)) == filter_
    assert filter_from_proto(common_pb2.Filter()) is None


@pytest.mark.parametrize("clause, message", [
    (common_pb2.FilterClause(key="year"), "clause 0 (key 'year'): set exactly one"),
    (common_pb2.FilterClause(key="bad key!", equals=common_pb2.MetadataValue(string_value="x")), "the key must be"),
    (common_pb2.FilterClause(key="year", range=common_pb2.NumberRange()), "range needs at least one"),
    (common_pb2.FilterClause(key="year", range=common_pb2.NumberRange(gte=2010, lte=2000)), "above the upper bound"),
    (common_pb2.FilterClause(key="year", range=common_pb2.NumberRange(gte=1, gt=2)), "one lower bound"),
    (common_pb2.FilterClause(key="year", range=common_pb2.NumberRange(lte=float("nan"))), "finite"),
    (common_pb2.FilterClause(key="tags", any_of=common_pb2.ValueList()), "any_of needs"),
    (common_pb2.FilterClause(key="tags", equals=common_pb2.MetadataValue(
        string_list=common_pb2.StringList(values=["a"]))), "any_of for several"),
])
def test_a_malformed_clause_is_invalid_argument_naming_it(clause, message):
    ok = common_pb2.FilterClause(key="lang", equals=common_pb2.MetadataValue(string_value="en"))
    with pytest.raises(errors.InvalidArgument, match="filter clause 1") as raised:
        filter_from_proto(common_pb2.Filter(clauses=[ok, clause]))
    assert message.replace("clause 0", "clause 1") in str(raised.value)


@pytest.mark.parametrize("texts, expected", [
    (["price<=100"], [FilterClause("price", range=NumberRange(lte=100.0))]),
    (["price >= 5.5", "price<9"], [FilterClause("price", range=NumberRange(gte=5.5)),
                                   FilterClause("price", range=NumberRange(lt=9.0))]),
    (["tags=travel"], [FilterClause("tags", equals="travel")]),
    (["in_stock=true"], [FilterClause("in_stock", equals=True)]),
    (['code="007"'], [FilterClause("code", equals="007")]),
    (["category in garden,outdoor"], [FilterClause("category", any_of=("garden", "outdoor"))]),
    (['brand in "Acme, Inc", Other'], [FilterClause("brand", any_of=("Acme, Inc", "Other"))]),
    (['code in "007",8'], [FilterClause("code", any_of=("007", 8))]),
    (['{"price": {"gt": 1, "lte": 100}, "tags": "travel", "brand": ["a", "b"]}'],
     [FilterClause("price", range=NumberRange(gt=1.0, lte=100.0)), FilterClause("tags", equals="travel"),
      FilterClause("brand", any_of=("a", "b"))]),
])
def test_filters_as_a_user_types_them(texts, expected):
    assert parse_filter(texts).clauses == tuple(expected)


@pytest.mark.parametrize("text, message", [
    ("price", "expected KEY=VALUE"),
    ("price<=cheap", "<= compares with a number, got 'cheap'"),
    ("price!=3", "no 'not equal'"),
    ("{not json", "not valid JSON"),
    ('{"price": {"lte": "x"}}', "range bounds must be numbers"),
    ("a=", "the value is empty"),
    ("a in x,", "the value is empty"),
    ("price==5", "the value starts with '='"),
    ("price=>5", "the value starts with '>'"),
    ('brand in "Acme, Inc', "a value with a comma in double quotes"),
])
def test_a_filter_that_does_not_parse_says_why(text, message):
    with pytest.raises(errors.InvalidArgument, match=re.escape(message)):
        parse_filter([text])
