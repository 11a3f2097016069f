"""Backup chains: a full backup and the incremental backups built on it, oldest first.

An incremental backup's HEADER names its parent (`parent_backup_id`) and the parent's stream digest
(`parent_digest`), so every link of a chain is checked before anything is written: a parent that
is missing, altered, replaced, from another database or given out of order is an IntegrityError.
The state a chain describes is merged tree by tree by the cores' `ChainMerge` (docs/FORMAT.md §5).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import (
    ArgumentTypeError,
    BackupError,
    IntegrityError,
    InvalidArgumentError,
    VersionMismatchError,
)
from .metadata import BackupMetadata

__all__ = ["resolve_chain", "check_link", "chain_trees", "ParentLookup", "MAX_CHAIN_LENGTH"]

# A guard against a cycle of crafted files; real chains are far shorter.
MAX_CHAIN_LENGTH = 10_000


def about_member(error: BackupError, path: str, role: str) -> BackupError:
    """`error` (of the same class) about the chain member at `path`: its message says which file
    (`role` names it: "parent", "chain member") and its `file` attribute holds the path."""
    message = f"{role} {path}: {error}"
    if isinstance(error, VersionMismatchError):
        named: BackupError = VersionMismatchError(error.found, error.expected, message)
    else:
        named = type(error)(message)
    named.file = path
    return named


def read_member(read_metadata: Callable[[str], BackupMetadata], path: str, role: str) -> BackupMetadata:
    """read_metadata(path) of a chain member, its errors about the file naming it (about_member)."""
    try:
        return read_metadata(path)
    except (InvalidArgumentError, ArgumentTypeError):
        raise  # about the argument, not the file
    except BackupError as e:  # missing, unreadable, damaged, another key: about this file
        raise about_member(e, path, role) from e


def check_link(child: BackupMetadata, parent: BackupMetadata) -> None:
    """IntegrityError (about `parent`'s file) unless `parent` is the backup `child` was made from."""
    try:
        _check_link(child, parent)
    except IntegrityError as e:
        e.file = parent.path
        raise


def _check_link(child: BackupMetadata, parent: BackupMetadata) -> None:
    if parent.backup_id != child.parent_backup_id:
        raise IntegrityError(
            f"{parent.path} is backup {parent.backup_id}, not the parent of backup {child.backup_id} "
            f"(which is {child.parent_backup_id}): the chain is out of order or mixes backups of another "
            "database; nothing was written"
        )
    if parent.checksum != child.parent_digest:
        raise IntegrityError(
            f"parent backup {parent.backup_id} ({parent.path}) is not the one backup {child.backup_id} was "
            "made from (its digest differs: it was altered or replaced); nothing was written"
        )


class ParentLookup:
    """The backups of one directory by backup id, for finding a chain's parents. The files are
    read one at a time, newest first by modification time (a parent is written before its child,
    most often just before it), and each at most once. Reading a file runs its key derivation
    (Argon2id, for a passphrase), so a chain of N backups among M files costs about N reads
    rather than M for each link.

    `files()`: the directory's candidate paths, newest first; `read(path)`: the file's metadata, or
    the error that makes it no backup readable with this key (skipped, and kept in `unreadable`
    for the message if the parent is not found)."""

    def __init__(self, files: Callable[[], list[str]], read: Callable[[str], BackupMetadata | BackupError]) -> None:
        self._files = files
        self._read = read
        self.unreadable: list[tuple[str, BackupError]] = []
        self._pending: Iterator[str] | None = None
        self._found: dict[str, list[BackupMetadata]] = {}
        self._read_already: set[str] = set()

    def remember(self, meta: BackupMetadata) -> None:
        """A backup read already: its file is not read again."""
        self._found.setdefault(str(meta.backup_id), []).append(meta)
        if meta.path is not None:
            self._read_already.add(os.path.realpath(meta.path))

    def get(self, backup_id: str, digest: str | None = None) -> BackupMetadata | None:
        """A backup with this id, and this digest (checksum) if one of them has it: a copy that
        was altered or replaced does not hide the intact one. None if no file has the id."""

        def match() -> BackupMetadata | None:
            return next((m for m in self._found.get(backup_id, ()) if digest is None or m.checksum == digest), None)

        if (hit := match()) is not None:
            return hit
        if self._pending is None:
            self._pending = iter(self._files())
        for path in self._pending:
            if os.path.realpath(path) in self._read_already:
                continue
            meta = self._read(path)
            if isinstance(meta, BackupError):
                self.unreadable.append((path, meta))
            else:
                self.remember(meta)
                if (hit := match()) is not None:
                    return hit
        same_id = self._found.get(backup_id)
        return same_id[0] if same_id else None  # check_link names what is wrong with it


def resolve_chain(
    newest: BackupMetadata,
    read_metadata: Callable[[str], BackupMetadata],
    lookup: Callable[[str], ParentLookup],
    explicit: Sequence[str] | None = None,
) -> list[BackupMetadata]:
    """The chain ending with `newest`, oldest (its full backup) first, every link checked.

    `explicit`: the parents' paths, oldest first (`newest` itself may end the list). Otherwise the
    parents are looked up by backup id in `lookup(directory)` of the directory holding `newest`
    (as given; if that is a symlink to another directory, then also in its target's).
    """
    members = [newest]
    if explicit is not None:
        seen: set[str] = set()
        for p in explicit:
            if os.path.realpath(p) in seen:
                raise InvalidArgumentError(f"chain lists {p} more than once: give each parent once, oldest first")
            seen.add(os.path.realpath(p))
        given = [read_member(read_metadata, p, "chain member") for p in explicit]
        if given and given[-1].backup_id == newest.backup_id:
            given.pop()
        while members[-1].is_incremental and given:
            parent = given.pop()
            check_link(members[-1], parent)
            members.append(parent)
        if given:
            raise InvalidArgumentError(
                f"chain lists {', '.join(str(m.path) for m in given)}, which "
                f"{'is' if len(given) == 1 else 'are'} not in the chain of backup {newest.backup_id}"
            )
    # The directory of the newest backup as given, then (if it is a symlink elsewhere) its target's.
    given_path = newest.path or "."
    directories = list(
        dict.fromkeys(os.path.dirname(p) for p in (os.path.abspath(given_path), os.path.realpath(given_path)))
    )
    lookups: list[ParentLookup] = []
    while members[-1].is_incremental:
        child = members[-1]
        if explicit is not None:
            raise IntegrityError(
                f"backup {child.backup_id} is an incremental of backup {child.parent_backup_id}, which chain= "
                "does not list: give every parent, oldest (the full backup) first; nothing was written"
            )
        if not lookups:
            lookups = [lookup(d) for d in directories]
            for found in lookups:
                found.remember(newest)
        found_parent = None
        for found in lookups:  # the next directory only if this one has no copy with the digest
            copy = found.get(str(child.parent_backup_id), child.parent_digest)
            if copy is not None and (found_parent is None or copy.checksum == child.parent_digest):
                found_parent = copy  # a copy with another digest: check_link says what is wrong
            if found_parent is not None and found_parent.checksum == child.parent_digest:
                break
        if found_parent is None:
            skipped = [f"{os.path.basename(p)} ({e})" for found in lookups for p, e in found.unreadable]
            unread = (
                f" ({len(skipped)} file(s) there could not be read with this key: {'; '.join(skipped[:3])}"
                f"{'; ...' if len(skipped) > 3 else ''})"
                if skipped
                else ""
            )
            raise IntegrityError(
                f"backup {child.backup_id} is an incremental of backup {child.parent_backup_id}, which is not "
                f"in {' or '.join(directories)}{unread}: keep a chain's backups in one directory, or name the "
                "parents (RestoreOptions(chain=[...]) or BackupOptions(chain=[...]); CLI: --chain PARENT, once per "
                "parent); nothing was written"
            )
        check_link(child, found_parent)
        members.append(found_parent)
        if len(members) > MAX_CHAIN_LENGTH:
            raise IntegrityError(f"the chain of backup {newest.backup_id} is longer than {MAX_CHAIN_LENGTH} backups")
    members.reverse()
    return members


def _sorted_trees(meta: BackupMetadata) -> list[str]:
    names = list(meta.trees)
    if names != sorted(set(names)):
        raise IntegrityError(
            f"backup {meta.backup_id} does not list its trees in name order, so it cannot be part of a chain; "
            "make a new full backup"
        )
    return names


def chain_trees(
    core: Any, chain: Sequence[BackupMetadata], readers: Sequence[Any], names: Sequence[str]
) -> Iterator[tuple[str, Any]]:
    """(name, ChainMerge) for each of `names` (in name order), each merge over the members that hold
    the tree; `readers` are the members' unlocked readers. A consumer need not drain a merge. At the
    end every reader has read and checked its whole file."""
    held = [set(_sorted_trees(m)) for m in chain]
    for name in sorted(names):
        holders = [i for i, trees in enumerate(held) if name in trees]
        for i in holders:
            while (got := readers[i].next_tree()) != name:
                if got is None or got > name:
                    raise IntegrityError(
                        f"backup {chain[i].backup_id} lists tree {name!r} in its header but does not hold it"
                    )
        # The tree's latest whole-tree delete: what the members before it held no longer exists.
        deleted_at = max((j for j, m in enumerate(chain) if name in m.deleted_trees), default=-1)
        merge = core.ChainMerge([readers[i] for i in holders], stale=sum(i < deleted_at for i in holders))
        yield name, merge
        while merge.skip_items():
            pass
    for i, reader in enumerate(readers):  # the rest of each file: skipped trees are read and checked
        while (extra := reader.next_tree()) is not None:
            if extra not in held[i]:
                raise IntegrityError(f"backup {chain[i].backup_id} holds a tree its header does not list: {extra!r}")


def tree_names(chain: Sequence[BackupMetadata]) -> list[str]:
    """Every tree a chain touches: those it holds and those it deleted, in name order."""
    names: set[str] = set()
    for m in chain:
        names.update(m.trees)
        names.update(m.deleted_trees)
    return sorted(names)
