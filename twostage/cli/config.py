"""``twostage config``: every setting of every service, with its env var."""

from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("config", help="list every setting with its env var, default and meaning")
    parser.add_argument("service", nargs="?", choices=["recall", "rerank", "gateway"], default=None)
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (the README's)")
    parser.set_defaults(run=run)


def settings_classes() -> dict:
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings
    from rerank_server.config import RerankSettings

    return {"gateway": GatewaySettings, "recall": RecallSettings, "rerank": RerankSettings}


def check_settings_file(path) -> None:
    """A settings file meant for several processes, each service's lines checked (names and values) before any
    of them starts: a mistake is one clear error here, not a child that dies."""
    from twostage.config import load_settings, settings_file_lines

    for cls in settings_classes().values():
        found = settings_file_lines(Path(path), cls)
        load_settings(cls, {field: f"settings file {path}, line {number}" for field, (_, number) in found.items()},
                      **{field: value for field, (value, _) in found.items()})


def run(args) -> None:
    for name, cls in settings_classes().items():
        if args.service and args.service != name:
            continue
        prefix = cls.model_config["env_prefix"]
        current = cls()  # includes env overrides
        if args.markdown:
            print(f"\n#### {name} (`twostage serve {name}`, env prefix `{prefix}`)\n")
            print("| flag | default | meaning |\n|---|---|---|")
        else:
            print(f"\n{name} (env prefix {prefix})")
        for field_name, field in cls.model_fields.items():
            flag = "--" + field_name.replace("_", "-")
            if args.markdown:
                default = str(field.default).replace(str(Path.home()), "~")
                print(f"| `{flag}` | `{default}` | {field.description} |")
            else:
                print(f"  {flag:24} {prefix}{field_name.upper():28} = {getattr(current, field_name)!s:12} {field.description}")
