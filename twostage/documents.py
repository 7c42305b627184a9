"""What a valid document is: the one set of rules for Upsert, ``docs upsert``
and ``index build``, so a corpus that builds also upserts and vice versa."""

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from twostage import errors
from twostage.corpus import Document, MetadataValue, document_from_row, document_text
from twostage.wording import count_of

# Printable, no whitespace at the ends: ids travel in logs, URLs and TSV files.
_ID_PATTERN = re.compile(r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$")
METADATA_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class DocumentLimits:
    """Bounds on one write request; the recall server's settings supply the first three."""

    max_docs: int
    max_doc_chars: int
    max_id_chars: int
    max_metadata_keys: int = 64
    max_metadata_value_chars: int = 4096
    max_metadata_list_items: int = 256


# The recall server's defaults; the gateway checks writes against them until the recall tier publishes its own.
DEFAULT_LIMITS = DocumentLimits(max_docs=1000, max_doc_chars=100_000, max_id_chars=256)


def check_id(doc_id: str, where: str, limits: DocumentLimits) -> None:
    if not doc_id:
        raise errors.InvalidArgument(f"{where}: the document has no id; give each one an _id (or id)")
    if len(doc_id) > limits.max_id_chars or not _ID_PATTERN.match(doc_id):
        raise errors.InvalidArgument(
            f"{where}: id {doc_id[:40]!r} is malformed: 1-{limits.max_id_chars} printable characters, "
            "no surrounding whitespace"
        )


MAX_REQUEST_ID_CHARS = 128


def check_request_id(request_id: str) -> None:
    """A write's request_id names it for resends: printable, bounded (servers remember them)."""
    if request_id and (len(request_id) > MAX_REQUEST_ID_CHARS or not _ID_PATTERN.match(request_id)):
        raise errors.InvalidArgument(f"request_id {request_id[:40]!r} is malformed: 1-{MAX_REQUEST_ID_CHARS} "
                                     "printable characters, no surrounding whitespace")


def check_ids(ids: list[str], limits: DocumentLimits, field: str = "ids") -> None:
    """Count, form and uniqueness of the ids of one request."""
    errors.check_limit(f"{field} (count)", len(ids), 1, limits.max_docs)
    seen = set()
    for i, doc_id in enumerate(ids):
        check_id(doc_id, f"{field}[{i}]", limits)
        if doc_id in seen:
            raise errors.InvalidArgument(f"{field}[{i}]: id {doc_id!r} appears more than once in the request")
        seen.add(doc_id)


def check_metadata(metadata: dict[str, MetadataValue], where: str, limits: DocumentLimits) -> None:
    if len(metadata) > limits.max_metadata_keys:
        raise errors.InvalidArgument(f"{where}: {len(metadata)} metadata keys; the limit is {limits.max_metadata_keys}")
    for key, value in metadata.items():
        if not METADATA_KEY_PATTERN.match(key):
            raise errors.InvalidArgument(
                f"{where}: metadata key {key[:40]!r} must be 1-128 letters, digits or _.:-"
            )
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > limits.max_metadata_list_items:
            raise errors.InvalidArgument(
                f"{where}: metadata {key!r} has {len(value)} items; the limit is {limits.max_metadata_list_items}"
            )
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise errors.InvalidArgument(f"{where}: metadata {key!r} must be a finite number")
            if isinstance(item, str) and len(item) > limits.max_metadata_value_chars:
                raise errors.InvalidArgument(
                    f"{where}: metadata {key!r} is {len(item)} characters; the limit is "
                    f"{limits.max_metadata_value_chars}"
                )


def check_document(doc: Document, where: str, limits: DocumentLimits) -> None:
    """Everything about one document except uniqueness of its id."""
    check_id(doc.id, where, limits)
    text = document_text(doc)
    if not text.strip():
        raise errors.InvalidArgument(f"{where}: document {doc.id!r} has no title or text")
    if len(text) > limits.max_doc_chars:
        raise errors.InvalidArgument(
            f"{where}: document {doc.id!r} title + text is {len(text)} characters; the limit is {limits.max_doc_chars}"
        )
    check_metadata(doc.metadata, where, limits)


def check_documents(docs: Iterable[Document], limits: DocumentLimits) -> None:
    """A whole write request: count, each document, no id twice."""
    docs = list(docs)
    errors.check_limit("documents (count)", len(docs), 1, limits.max_docs)
    seen = set()
    for i, doc in enumerate(docs):
        check_document(doc, f"documents[{i}]", limits)
        if doc.id in seen:
            raise errors.InvalidArgument(f"documents[{i}]: id {doc.id!r} appears more than once in the request")
        seen.add(doc.id)


@dataclass
class CorpusScan:
    """What one pass over a JSONL corpus found, before anything is embedded."""

    valid: int = 0
    invalid: dict[int, str] = field(default_factory=dict)  # line number -> why
    dropped_fields: Counter = field(default_factory=Counter)  # field name -> documents it was dropped from
    dropped_at: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # field name -> (line, id), first few
    schema: dict[str, str] = field(default_factory=dict)  # metadata key -> type (twostage.schema)

    def dropped_warnings(self, most: int = 3) -> list[str]:
        """One line per dropped field, naming the lines and ids it was dropped from."""
        warnings = []
        for name, count in self.dropped_fields.most_common():
            where = ", ".join(f"line {n} (id {doc_id!r})" for n, doc_id in self.dropped_at[name][:most])
            more = f" and {count_of(count - most, 'more')}" if count > most else ""
            warnings.append(f"field {name!r} dropped from {count_of(count, 'document')}: {where}{more}; metadata "
                            "holds strings, numbers, booleans and lists of strings")
        return warnings

    def problems(self, most: int = 5) -> str:
        shown = [f"line {n}: {why}" for n, why in list(self.invalid.items())[:most]]
        more = len(self.invalid) - len(shown)
        return "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def scan_corpus(lines: Iterable[tuple[int, str]], limits: DocumentLimits,
                schema: dict[str, str] | None = None) -> CorpusScan:
    """Validate every line as Upsert would: JSON, each document, ids unique across the file
    (a repeated id is invalid where it repeats), each metadata key of one type (the first line with
    the key sets it, unless ``schema`` declares it); ``scan.schema`` is the schema found."""
    from twostage.schema import conform

    scan = CorpusScan(schema=dict(schema or {}))
    first_line_of: dict[str, int] = {}
    for number, line in lines:
        try:
            doc, dropped = document_from_row(json.loads(line))
            check_document(doc, "document", limits)
            _, added = conform([doc], scan.schema, hint=False)
        except json.JSONDecodeError as error:
            scan.invalid[number] = f"not JSON: {error.msg} at column {error.colno}"
            continue
        except (ValueError, errors.InvalidArgument) as error:
            scan.invalid[number] = str(error).removeprefix("document: ").removeprefix("documents[0]: ")
            continue
        if doc.id in first_line_of:
            scan.invalid[number] = f"id {doc.id!r} already appears on line {first_line_of[doc.id]}"
            continue
        first_line_of[doc.id] = number
        scan.schema.update(added)
        scan.dropped_fields.update(dropped)
        for name in dropped:
            scan.dropped_at.setdefault(name, []).append((number, doc.id))
        scan.valid += 1
    return scan


def valid_documents(lines: Iterable[tuple[int, str]], scan: CorpusScan) -> Iterator[Document]:
    """The documents a scan found valid, in file order."""
    for number, line in lines:
        if number not in scan.invalid:
            yield document_from_row(json.loads(line))[0]
