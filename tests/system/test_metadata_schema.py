"""Each index's metadata schema: a key's type is declared at build or set by its first value, stored with the
index, and a write or a filter that contradicts it is INVALID_ARGUMENT naming the document (or clause) and the
key, through a real gateway over a real recall server. Rows copied from a peer are never refused."""

import json

import grpc
import numpy as np
import pytest

from gateway.config import GatewaySettings
from gateway.servicer import build_server as build_gateway
from recall_server.build import build_from_corpus
from recall_server.config import RecallSettings
from recall_server.docstore import Write
from recall_server.index import IndexManifest
from recall_server.service import RecallService
from recall_server.servicer import build_server as build_recall
from twostage import errors
from twostage.cli import main
from twostage.convert import document_to_proto, filter_to_proto
from twostage.corpus import Document, document_from_row
from twostage.documents import DocumentLimits, scan_corpus
from twostage.filters import parse_filter
from twostage.schema import check_filter_types, conform
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from twostage.versions import Version

pytestmark = pytest.mark.slow

PRODUCTS = [
    {"_id": f"p{i}", "title": title, "text": text, "price": price, "in_stock": i % 2 == 0, "tags": tags,
     "category": category}
    for i, (title, text, price, tags, category) in enumerate([
        ("Pour-over coffee maker", "Glass carafe and paper filters for a morning brew.", 24.5, ["kitchen"], "home"),
        ("Two-person tent", "A light shelter for sleeping outdoors.", 129, ["outdoor", "travel"], "outdoor"),
        ("Wool blanket", "Keeps you warm through winter nights.", 59.99, ["home"], "home"),
        ("Desk lamp", "A bright LED light for studying at night.", 19, ["office"], "office"),
    ])
]
LIMITS = DocumentLimits(max_docs=100, max_doc_chars=10_000, max_id_chars=128)


def lines(rows):
    return [(n, json.dumps(r)) for n, r in enumerate(rows, 1)]


def test_a_corpus_scan_infers_the_schema_and_refuses_a_line_that_contradicts_it():
    scan = scan_corpus(lines([*PRODUCTS, {"_id": "bad", "text": "x", "price": "12.99"}]), LIMITS)
    assert scan.schema == {"price": "number", "in_stock": "bool", "tags": "string_list", "category": "string"}
    assert scan.invalid == {5: "document 'bad' metadata 'price' is a string ('12.99'), but this index holds "
                               "numbers under 'price'"}
    declared = scan_corpus(lines(PRODUCTS), LIMITS, {"price": "string"})
    assert 1 in declared.invalid and "holds strings under 'price'" in declared.invalid[1]


def test_a_top_level_field_and_the_same_metadata_key_conflict():
    with pytest.raises(errors.InvalidArgument, match="'price' is both a top-level field and a key of metadata"):
        document_from_row({"_id": "a", "text": "x", "price": 3, "metadata": {"price": 4}})
    scan = scan_corpus(lines([{"_id": "a", "text": "x", "price": 3, "metadata": {"price": 4}}]), LIMITS)
    assert "both a top-level field and a key of metadata" in scan.invalid[1]


def test_coercion_only_when_allowed_and_only_when_nothing_is_lost():
    schema = {"price": "number", "in_stock": "bool", "tags": "string_list", "sku": "string"}
    docs = [Document("a", "", "x", {"price": "12.99", "in_stock": "true", "tags": "travel", "sku": 7})]
    with pytest.raises(errors.InvalidArgument, match=r"documents\[0\]: document 'a' metadata 'price' is a string"):
        conform(docs, schema)
    (converted,), added = conform(docs, schema, coerce=True)
    assert converted.metadata == {"price": 12.99, "in_stock": True, "tags": ["travel"], "sku": "7"} and added == {}
    with pytest.raises(errors.InvalidArgument, match="'price' is a string"):
        conform([Document("a", "", "x", {"price": "cheap"})], schema, coerce=True)
    # Only JSON's number syntax, and only what a double holds exactly.
    for lossy in ("9007199254740993", "12.999999999999999999", "0012", "1_000", "\u0661\u0662", "nan", " 12"):
        with pytest.raises(errors.InvalidArgument, match="'price' is a string"):
            conform([Document("a", "", "x", {"price": lossy})], schema, coerce=True)
    (exact,), _ = conform([Document("a", "", "x", {"price": "1e3"})], schema, coerce=True)
    assert exact.metadata["price"] == 1000.0
    # Within one request the first value of a new key types it.
    with pytest.raises(errors.InvalidArgument, match=r"documents\[1\]: document 'c' metadata 'size' is a number"):
        conform([Document("b", "", "x", {"size": "L"}), Document("c", "", "x", {"size": 3})], {})


@pytest.mark.parametrize("text, message", [
    ("price=cheap", "filter clause 0 (key 'price'): 'cheap' is a string, but this index holds numbers under 'price'"),
    ("in_stock=\"true\"", "filter clause 0 (key 'in_stock'): 'true' is a string, but this index holds booleans"),
    ("tags<=3", "filter clause 0 (key 'tags'): a range compares numbers, but this index holds lists of strings"),
    ("category in home,1", "filter clause 0 (key 'category'): 1 is a number, but this index holds strings"),
])
def test_a_filter_of_the_wrong_type_names_its_clause(text, message):
    schema = {"price": "number", "in_stock": "bool", "tags": "string_list", "category": "string"}
    with pytest.raises(errors.InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_filter_types(parse_filter([text]), schema)
    check_filter_types(parse_filter(["tags=travel", "price<=20", "in_stock=true", "unknown=1"]), schema)


@pytest.fixture(scope="module")
def product_index(tmp_path_factory, models):
    corpus = tmp_path_factory.mktemp("products") / "products.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in PRODUCTS))
    out = tmp_path_factory.mktemp("built") / "index"
    report = build_from_corpus(corpus, out, progress=False, schema={"rating": "number"})
    return out, report


def test_index_build_stores_and_reports_the_schema(product_index, tmp_path, capsys):
    out, report = product_index
    expected = {"category": "string", "in_stock": "bool", "price": "number", "rating": "number",
                "tags": "string_list"}
    assert report.schema == expected
    assert IndexManifest.read(out).metadata_schema == expected
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in PRODUCTS[:2]))
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "i")]) in (0, None)
    assert ("metadata schema: category (string), in_stock (bool), price (number), tags (string_list)"
            in capsys.readouterr().out)


async def test_writes_and_filters_are_checked_against_the_schema(product_index, tmp_path, channel_to):
    import shutil

    directory = tmp_path / "index"
    shutil.copytree(product_index[0], directory)
    recall = build_recall(RecallService(RecallSettings(port=0, index_dir=directory)))
    recall_target = f"127.0.0.1:{await recall.start()}"
    gateway = build_gateway(GatewaySettings(port=0, recall_targets=recall_target, rerank_targets="127.0.0.1:1",
                                            startup_wait_s=0))
    stub = gateway_pb2_grpc.GatewayStub(channel_to(f"127.0.0.1:{await gateway.start()}"))
    try:
        good = Document("new-1", "Camping stove", "Boils water fast.", {"price": 45, "tags": ["outdoor"]})
        bad = Document("new-2", "Kettle", "Boils water.", {"price": "12.99"})
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Upsert(common_pb2.UpsertRequest(documents=[document_to_proto(good), document_to_proto(bad)]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("documents[1]: document 'new-2' metadata 'price' is a string ('12.99'), but this index holds numbers "
                "under 'price'") in refused.value.details()
        await stub.Upsert(common_pb2.UpsertRequest(documents=[document_to_proto(good)]))

        async def search(text: str) -> list[str]:
            reply = await stub.Search(gateway_pb2.SearchRequest(
                query="things for outdoors", recall_k=20, top_k=20, skip_rerank=True,
                filter=filter_to_proto(parse_filter([text]))))
            return sorted(h.id for h in reply.hits)

        assert await search("price<=50") == ["new-1", "p0", "p3"]
        assert await search("tags=outdoor") == ["new-1", "p1"]
        for text, clause in (("price=cheap", "filter clause 0 (key 'price')"),
                             ('in_stock="true"', "filter clause 0 (key 'in_stock')")):
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await search(text)
            assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT and clause in wrong.value.details()
    finally:
        await gateway.stop(grace_s=1)
        await recall.stop(grace_s=1)
    assert IndexManifest.read(directory).metadata_schema["price"] == "number"  # saved with the manifest on close

    # --metadata-coerce: a number written as a string is stored as the number, and a range finds it.
    coercing = RecallService(RecallSettings(port=0, index_dir=directory, metadata_coerce=True))
    server = build_recall(coercing)
    await server.start()
    try:
        await coercing.upsert([bad])
        assert coercing.index.get(["new-2"])["new-2"].metadata == {"price": 12.99}
        answer = await coercing.answer("kettle", 20, filter_=parse_filter(["price<=20"]), mode="lexical")
        assert "new-2" in {c.document.id for c in answer.candidates}
        # A row a peer accepted is copied as it is (refusing it would leave the replicas apart for good), and
        # the contradiction is counted: a price filter misses that row, and the operator must be able to see it.
        from recall_server.docstore import SCHEMA_CONFLICTS

        conflicts = SCHEMA_CONFLICTS._value.get()
        copied = Write(Document("peer-1", "", "From a peer.", {"price": "n/a"}), np.ones(384, np.float32),
                       Version(1 << 60, "peer"))
        coercing.index.apply([copied])
        assert coercing.index.get(["peer-1"])["peer-1"].metadata == {"price": "n/a"}
        assert coercing.index.store.schema()["price"] == "number"
        assert SCHEMA_CONFLICTS._value.get() == conflicts + 1
    finally:
        await server.stop(grace_s=1)


def test_corpus_warnings_name_lines_and_ids_in_good_english():
    rows = [{"_id": "a", "text": "x", "tags": [1, 2]}, {"_id": "b", "text": "y"}, {"_id": "c", "text": "z",
                                                                                    "dims": {"w": 3}}]
    scan = scan_corpus(lines(rows), LIMITS)
    tail = "; metadata holds strings, numbers, booleans and lists of strings"
    assert scan.dropped_warnings() == [f"field 'tags' dropped from 1 document: line 1 (id 'a'){tail}",
                                       f"field 'dims' dropped from 1 document: line 3 (id 'c'){tail}"]
    assert scan_corpus(lines([{"text": "no id"}]), LIMITS).invalid == {
        1: "the document has no id; give each one an _id (or id)"}
