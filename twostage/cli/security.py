"""``twostage certs dev`` and ``twostage auth add-token``."""

from pathlib import Path


def register(commands) -> None:
    certs = commands.add_parser("certs", help="TLS certificates")
    certs_actions = certs.add_subparsers(dest="action", required=True)
    dev = certs_actions.add_parser(
        "dev", help="a development CA with server and client certificates for localhost and 127.0.0.1"
    )
    dev.add_argument("--out", type=Path, required=True, help="directory for ca.pem, server.pem/.key, client.pem/.key")
    dev.add_argument("--days", type=int, default=365, help="validity")
    dev.set_defaults(run=_certs_dev)

    auth = commands.add_parser("auth", help="bearer tokens")
    auth_actions = auth.add_subparsers(dest="action", required=True)
    add = auth_actions.add_parser("add-token", help="print a new token and append its hash to the tokens file")
    add.add_argument("--role", choices=["search", "admin"], required=True,
                     help="search: search, rerank, get and info; admin: also upsert and delete")
    add.add_argument("--file", type=Path, required=True, help="the tokens file (created with mode 0600)")
    add.add_argument("--label", default="", help="a note stored beside the hash (who holds the token)")
    add.set_defaults(run=_add_token)


def _certs_dev(args) -> None:
    from twostage.dev_certs import write_dev_certs

    for path in write_dev_certs(args.out, args.days):
        print(path)


def _add_token(args) -> None:
    from twostage.auth import add_token

    # The token goes to stdout alone so that `TOKEN=$(twostage auth add-token ...)` works; it is not stored.
    print(add_token(args.file, args.role, args.label))
