"""``twostage docs upsert|delete|get``: write and read documents through the
gateway, which routes each id to the shard that owns it."""

import json
import sys
from pathlib import Path

import grpc
from tqdm import tqdm

from twostage.cli.args import positive_int
from twostage.cli.client import add_target_flag, explain
from twostage.connect import credentials_from_args
from twostage.errors import InvalidArgument
from twostage.wording import count_of


def register(commands) -> None:
    parser = commands.add_parser("docs", help="add, remove and show documents on a running stack")
    actions = parser.add_subparsers(dest="action", required=True)
    upsert = actions.add_parser(
        "upsert", help="add or replace documents from JSONL (the format of 'index build')",
        description="Each line: _id (or id), title, text; other fields and a 'metadata' object become metadata. "
        "Every line is checked before anything is sent.",
    )
    upsert.add_argument("file", help="JSONL file, or - for standard input")
    upsert.add_argument("--batch-size", type=positive_int, default=64,
                        help="documents per request (each is embedded before it is acknowledged)")
    upsert.add_argument("--skip-invalid", action="store_true", help="send the valid lines, report the others")
    upsert.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each request")
    delete = actions.add_parser("delete", help="remove documents by id (unknown ids are not an error)")
    delete.add_argument("ids", nargs="+", metavar="ID")
    get = actions.add_parser("get", help="show stored documents as JSON lines")
    get.add_argument("ids", nargs="+", metavar="ID")
    for sub, run in ((upsert, _upsert), (delete, _delete), (get, _get)):
        add_target_flag(sub)
        sub.set_defaults(run=run)
    for sub in (delete, get):
        sub.add_argument("--timeout-s", type=float, default=60.0)


def _read_lines(source: str) -> list[tuple[int, str]]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _upsert(args) -> int:
    from recall_server.config import RecallSettings
    from twostage.convert import document_to_proto
    from twostage.documents import scan_corpus, valid_documents
    from twostage.v1 import common_pb2, gateway_pb2_grpc

    lines = _read_lines(args.file)
    limits = RecallSettings().document_limits()
    scan = scan_corpus(lines, limits)
    name = "standard input" if args.file == "-" else args.file
    if scan.invalid and not args.skip_invalid:
        raise InvalidArgument(f"{name}: {len(scan.invalid)} invalid lines, nothing sent: {scan.problems()}. "
                              "Fix them, or pass --skip-invalid to send the rest")
    if scan.invalid:
        print(f"skipping {len(scan.invalid)} invalid lines: {scan.problems()}", file=sys.stderr)
    for warning in scan.dropped_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    if scan.valid == 0:
        raise InvalidArgument(f"{name}: no documents to send")
    docs = list(valid_documents(lines, scan))
    batch_size = min(args.batch_size, limits.max_docs)
    sent = 0
    credentials = credentials_from_args(args)
    with credentials.channel(args.target) as channel, tqdm(total=len(docs), unit="doc", desc="upserting") as bar:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for start in range(0, len(docs), batch_size):
            batch = docs[start:start + batch_size]
            try:
                stub.Upsert(common_pb2.UpsertRequest(documents=[document_to_proto(d) for d in batch]),
                            timeout=args.timeout_s, metadata=credentials.metadata)
            except grpc.RpcError as error:
                bar.close()
                print(f"twostage: upsert failed: {explain(error, args.target)}", file=sys.stderr)
                print(f"{count_of(sent, 'document')} before it {'was' if sent == 1 else 'were'} stored; resending "
                      "the file is safe", file=sys.stderr)
                return 1
            sent += len(batch)
            bar.update(len(batch))
    print(f"upserted {count_of(sent, 'document')}")
    return 0


def _ask_gateway(args, method: str, request):
    """One call to the gateway; None (after saying why) when it fails."""
    from twostage.v1 import gateway_pb2_grpc

    credentials = credentials_from_args(args)
    with credentials.channel(args.target) as channel:
        try:
            return getattr(gateway_pb2_grpc.GatewayStub(channel), method)(
                request, timeout=args.timeout_s, metadata=credentials.metadata
            )
        except grpc.RpcError as error:
            print(f"twostage: {method.lower()} failed: {explain(error, args.target)}", file=sys.stderr)
            return None


def _delete(args) -> int:
    from twostage.v1 import common_pb2

    reply = _ask_gateway(args, "Delete", common_pb2.DeleteRequest(ids=args.ids))
    if reply is None:
        return 1
    absent = len(args.ids) - reply.deleted
    print(f"deleted {reply.deleted} of {count_of(len(args.ids), 'id')} ({absent} {'was' if absent == 1 else 'were'} "
          "not stored)")
    return 0


def _get(args) -> int:
    from twostage.convert import document_from_proto
    from twostage.v1 import common_pb2

    reply = _ask_gateway(args, "Get", common_pb2.GetRequest(ids=args.ids))
    if reply is None:
        return 1
    for proto in reply.documents:
        doc = document_from_proto(proto)
        print(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata},
                         ensure_ascii=False))
    for doc_id in reply.missing:
        print(f"not found: {doc_id}", file=sys.stderr)
    return 1 if reply.missing else 0
