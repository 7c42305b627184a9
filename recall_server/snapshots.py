"""Index snapshots: how index-build jobs hand shards to recall servers.

A build publishes each shard as ``ROOT/shard-I/VERSION/``: a complete index
plus ``snapshot.json``. It builds in a hidden ``.building-VERSION`` beside it
and renames it into place once complete, so a directory with a version name
is always whole (a rename is atomic on one filesystem; ROOT is a shared
volume or a synced copy of an object-store prefix).

A recall server given ``--snapshot-dir`` serves its shard's newest complete
snapshot: it copies it to its own volume (``index_dir`` is then a symlink to
that copy, switched atomically) and opens the copy for writing, so it takes
live writes like any index. When a newer snapshot appears it switches while
serving; writes it accepted since adopting the current snapshot are applied
on top of the new one, so no acknowledged write is lost to a switch.
"""

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from recall_server.durable import fsync_directory, fsync_file, write_atomically
from twostage.errors import ConfigError

log = logging.getLogger(__name__)
SNAPSHOT_FILE = "snapshot.json"
ADOPTED_FILE = "adopted.json"  # in a server's local copy: which snapshot, and where its own writes begin
BUILDING_PREFIX = ".building-"


@dataclass(frozen=True)
class Snapshot:
    version: str
    shard: int
    shards: int
    model: str
    documents: int
    created_at: float  # Unix seconds, when the build finished

    @property
    def order(self) -> tuple[float, str]:
        return self.created_at, self.version


def shard_root(root: Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard}"


def check_version(version: str) -> str:
    if not version or version.startswith(".") or "/" in version or version != version.strip():
        raise ConfigError(f"snapshot version {version!r}: expected a plain name such as 20261125T2100Z")
    return version


def default_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def building_dir(root: Path, shard: int, version: str) -> Path:
    """Where a build writes the snapshot before publishing it."""
    target = shard_root(root, shard) / check_version(version)
    if target.exists():
        raise FileExistsError(f"snapshot {target} already exists; choose another --version")
    return target.with_name(BUILDING_PREFIX + version)


def publish(built: Path, root: Path, snapshot: Snapshot) -> Path:
    """Mark a finished build complete and move it into place (the rename is the commit)."""
    (built / SNAPSHOT_FILE).write_text(json.dumps(asdict(snapshot), indent=2))
    target = shard_root(root, snapshot.shard) / snapshot.version
    built.rename(target)
    fsync_directory(target.parent)
    log.info("published snapshot %s (%d documents)", target, snapshot.documents)
    return target


def read_snapshot(directory: Path) -> Snapshot | None:
    try:
        return Snapshot(**json.loads((directory / SNAPSHOT_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def newest_snapshot(root: Path, shard: int) -> tuple[Snapshot, Path] | None:
    """The shard's newest complete snapshot, or None when there is none yet."""
    directory = shard_root(root, shard)
    if not directory.is_dir():
        return None
    found = [
        (snapshot, path) for path in directory.iterdir()
        if not path.name.startswith(".") and (snapshot := read_snapshot(path)) is not None and snapshot.shard == shard
    ]
    return max(found, key=lambda pair: pair[0].order, default=None)


@dataclass(frozen=True)
class Adoption:
    """What a server's local copy holds: the snapshot, and the store sequence after which writes are its own."""

    snapshot: Snapshot
    base_seq: int


def read_adoption(index_dir: Path) -> Adoption | None:
    try:
        data = json.loads((Path(index_dir) / ADOPTED_FILE).read_text())
        return Adoption(Snapshot(**data["snapshot"]), int(data["base_seq"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_managed(index_dir: Path) -> None:
    """With snapshots, index_dir belongs to the server: refuse to replace an index someone built there."""
    index_dir = Path(index_dir)
    if (index_dir.exists() or index_dir.is_symlink()) and not (
        index_dir.is_symlink() and read_adoption(index_dir) is not None
    ):
        raise ConfigError(
            f"{index_dir} exists and is not a snapshot copy this server made; with --snapshot-dir the server "
            "manages --index-dir itself: point --index-dir at an empty path on the server's volume"
        )


def copy_snapshot(source: Path, index_dir: Path, snapshot: Snapshot) -> Path:
    """Copy a snapshot next to index_dir (``index_dir.parent/snapshots/VERSION``); the copy is complete
    when its directory has its final name."""
    copies = Path(index_dir).parent / "snapshots"
    copies.mkdir(parents=True, exist_ok=True)
    fsync_directory(copies.parent)
    target = copies / snapshot.version
    if target.exists():
        shutil.rmtree(target)
    partial = copies / (".copy-" + snapshot.version)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(SNAPSHOT_FILE, ".lock"))
    # The adoption is recorded durably next: the files it names must be on disk before the copy takes its
    # name, and the name before the adoption.
    for directory, _, files in os.walk(partial):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_directory(Path(directory))
    partial.rename(target)
    fsync_directory(copies)
    return target


def record_adoption(copy: Path, snapshot: Snapshot, base_seq: int) -> None:
    write_atomically(copy / ADOPTED_FILE, json.dumps({"snapshot": asdict(snapshot), "base_seq": base_seq}).encode())


def point_at(index_dir: Path, copy: Path) -> None:
    """Switch the index_dir symlink to ``copy`` atomically (a restart then opens the copy)."""
    index_dir = Path(index_dir)
    link = index_dir.with_name("." + index_dir.name + ".link")
    link.unlink(missing_ok=True)
    link.symlink_to(copy.resolve())
    os.replace(link, index_dir)
    fsync_directory(index_dir.parent)
