# The interface shared by the Rust core (datafold._core) and the pure-Python core (datafold._pure).
# Both modules expose exactly these names with the same behaviour and the same exceptions
# (classes from datafold.errors). Files are byte-compatible; docs/FORMAT.md is the format.
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from typing_extensions import Buffer

CORE_NAME: str  # "rust" or "pure"
MAGIC: bytes  # b"DFBACKUP"
FORMAT_VERSION: int  # 1
DEFAULT_SEGMENT_SIZE: int  # 1 MiB
MIN_SEGMENT_SIZE: int  # 4096
MAX_SEGMENT_SIZE: int  # 64 MiB
MAX_PREAMBLE_LENGTH: int  # 4096

# (total_items, total_bytes, [(tree name, item_count, byte_count, digest32), ...], stream digest32)
TreeSummary = tuple[str, int, int, bytes]
Trailer = tuple[int, int, list[TreeSummary], bytes]

class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...

class _Source(Protocol):
    def read(self, n: int, /) -> bytes: ...

# --- one-shot Tink AES-GCM-HKDF streaming AEAD (first-segment offset 0) -------------------------
# hkdf_hash: "sha256" (default) or "sha1"; derived_key_size: 32 (AES-256) or 16 (AES-128).
# salt defaults to random bytes of derived_key_size, nonce_prefix to 7 random bytes.
# segment_size is the ciphertext segment size; it must leave at least one plaintext byte in the
# first segment (segment_size > header length + 16). Failures to authenticate raise IntegrityError;
# bad parameters raise ValueError (InvalidArgumentError naming the argument, whatever the size of
# an int) and non-int arguments TypeError (ArgumentTypeError); both cores word them alike.
# threads (here and on BackupWriter/BackupReader): segments are sealed/opened on up to this many
# threads (at most 1024), 0 = all cores. The Rust core releases the GIL for that work; the pure
# core accepts and validates the argument but always works on the calling thread.
# A BackupWriter, BackupReader or ChainMerge is a stream: one call at a time. With the Rust core a
# call made while another thread's call on the same object is under way raises RuntimeError
# ("Already borrowed"); the manager never shares one between threads.
def encrypt_stream(
    key: Buffer,
    plaintext: Buffer,
    aad: Buffer,
    segment_size: int,
    salt: Buffer | None = None,
    nonce_prefix: Buffer | None = None,
    *,
    hkdf_hash: str = "sha256",
    derived_key_size: int = 32,
    threads: int = 0,
) -> bytes: ...
def decrypt_stream(
    key: Buffer,
    ciphertext: Buffer,
    aad: Buffer,
    segment_size: int,
    *,
    hkdf_hash: str = "sha256",
    derived_key_size: int = 32,
    threads: int = 0,
) -> bytes: ...

# --- keys and digests -------------------------------------------------------------------------
def derive_key_id(backup_key: Buffer) -> bytes: ...  # 16 bytes
def digest_items(backup_key: Buffer, items: Iterable[tuple[Buffer, Buffer | None]]) -> tuple[int, int, bytes]:
    """(item_count, byte_count, tree digest) of PUT records (value is bytes) and DELETE records
    (value is None), exactly as a TREE_END of a tree holding these records in this order."""

def digest_batches(
    backup_key: Buffer, batches: Iterable[Iterable[tuple[Buffer, Buffer | None]]]
) -> tuple[int, int, bytes]:
    """digest_items over the records of several batches (a snapshot's batches() of one tree);
    a RecordBatch is read without a Python object per record."""

# --- preamble ---------------------------------------------------------------------------------
class Preamble:
    format_version: int
    preamble_length: int
    flags: int
    segment_size: int
    key_id: bytes
    kdf_id: int
    kdf_params: bytes
    raw: bytes  # the exact preamble bytes (the stream's associated data)

def encode_preamble(segment_size: int, key_id: Buffer, kdf_id: int = 0, kdf_params: Buffer = b"") -> bytes: ...
def parse_preamble(data: Buffer) -> Preamble:
    """data must hold at least the whole preamble (extra bytes are ignored). FormatError /
    VersionMismatchError as docs/FORMAT.md §1 says."""

# --- writing ----------------------------------------------------------------------------------
class BackupWriter:
    """State machine: OPEN -> (begin_tree -> IN_TREE -> end_tree -> OPEN)* -> finish -> FINISHED.
    Any error poisons it: every later call raises BackupError. Calls out of order raise
    InvalidArgumentError. Ciphertext goes to sink.write() in whole segments (one or a few per
    call; memory stays bounded by a few segments); an OSError from the sink becomes BackupIOError.
    With threads other than 1 the Rust core seals each batch on a thread of its own while the next
    one is framed, and hands it to the sink at the next batch or at finish: the sink lags up to
    one batch behind. A process forked while a batch is with that thread cannot go on with this
    writer (InvalidArgumentError); forked between batches, it can.
    The preamble and Tink header are written by __init__; the
    HEADER record is the first plaintext.

    compression_level 0 writes plain records (byte-identical between the cores); 1..=22 packs each
    tree's PUT / DELETE records into zstd BLOCK records of about 1 MiB (docs/FORMAT.md §7), stored
    raw when zstd saves less than 1/32. Anything else is an InvalidArgumentError (a non-int an
    ArgumentTypeError). The pure core needs the `zstandard` package for levels above 0 (without it:
    FormatError naming `pip install 'datafold[zstd]'`). Readers need no option."""

    def __init__(
        self,
        sink: _Sink,
        backup_key: Buffer,
        header: Buffer,
        *,
        segment_size: int = ...,
        kdf_id: int = 0,
        kdf_params: Buffer = b"",
        salt: Buffer | None = None,
        nonce_prefix: Buffer | None = None,
        threads: int = 0,
        compression_level: int = 0,
    ) -> None: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def preamble(self) -> bytes: ...
    def begin_tree(self, name: str) -> None: ...
    def add_items(self, items: Iterable[tuple[Buffer, Buffer]]) -> int:
        """PUT records from any iterable of (key, value); returns how many were added."""
    def add_deletes(self, keys: Iterable[Buffer]) -> int:
        """DELETE records; returns how many were added."""
    def end_tree(self) -> TreeSummary: ...
    def finish(self) -> Trailer:
        """Writes the TRAILER and the last segment. Does not close or flush the sink."""

# --- reading ----------------------------------------------------------------------------------
class BackupReader:
    """State machine: LOCKED -(unlock)-> READY -(next_tree)-> IN_TREE -(read_items until [])->
    READY ... -(next_tree returns None)-> DONE. Any error poisons it. __init__ reads and checks the
    preamble only (no key needed, so a passphrase's KDF parameters can be read first); unlock()
    reads the first segment and no further. With threads > 1 the Rust core then reads each batch of
    segments (2 per thread) while other threads open the one before, on the calling thread with the
    GIL held, so the source is read up to one batch ahead of the records handed out. The source
    is read like a blocking file: read(n) (or readinto(), which the Rust core prefers: two calls
    per segment, its ciphertext then its tag, and one byte past each batch) returns fewer bytes
    only at the end; None (a non-blocking file with no data yet) is a BackupIOError."""

    def __init__(self, source: _Source, *, threads: int = 0) -> None: ...
    @property
    def preamble(self) -> Preamble: ...
    def unlock(self, backup_key: Buffer) -> bytes:
        """Checks the key id (EncryptionKeyError), decrypts up to the end of the HEADER record and
        returns its payload (the metadata JSON)."""
    def next_tree(self) -> str | None:
        """Name of the next tree, or None after the TRAILER was read, checked against everything
        read, and the stream was found to end right after it. Called while a tree is open, it
        first reads and checks the rest of that tree (this is how a reader skips a tree)."""
    def read_items(self, max_items: int = 4096, max_bytes: int = 16 << 20) -> list[tuple[bytes, bytes | None]]:
        """Up to max_items records of the current tree: (key, value) for PUT, (key, None) for
        DELETE; the batch also ends once its keys and values reach max_bytes (at least one record
        is returned), so memory stays bounded with large values. [] once the tree's TREE_END was
        read and its count, bytes and digest checked. A limit < 1 is an InvalidArgumentError."""
    def skip_items(self, max_items: int = 4096, max_bytes: int = 16 << 20) -> int:
        """read_items without the records (no Python object per record): reads and checks up to
        max_items records of the current tree, fewer once their keys and values reach max_bytes
        (as read_items), and returns how many; 0 once its TREE_END was read and checked. For
        counting (a verify's progress)."""
    def write_items(
        self, writer: LmdbWriter, tree: int, *, prefix: bytes | None = None, overwrite: bool, max_items: int = 65536
    ) -> tuple[int, int, int, list[bytes], bool]:
        """Rust core only (the pure core's reader has no such method): read_items, but the records go
        straight into writer's tree (an index from LmdbWriter.open_tree), up to max_items of them.
        Records whose key lacks prefix are read and checked, not written; overwrite=False keeps
        existing values. Returns (written, skipped, deleted, skipped keys, whether the tree's
        TREE_END was read and checked). A failed write fails the writer and the reader."""
    @property
    def trailer(self) -> Trailer | None: ...  # set once next_tree() returned None
    def read_summary(self) -> Trailer:
        """After unlock(), on a seekable source: decrypts only the last segment(s) holding the
        TRAILER and returns it, without reading the segments in between (docs/FORMAT.md §6).
        Checks the trailer's internal sums. The reader is DONE afterwards."""

# --- backup chains (incremental backups) ------------------------------------------------------
class ChainMerge:
    """One tree across the readers of a backup chain (a full backup, then incrementals, oldest
    first), each positioned inside that tree (its next_tree() returned the name). Every member
    lists the tree's records in ascending key order; the merged state is one streaming pass in
    which the newest member holding a key wins. Members `0..stale` are older than the tree's
    latest whole-tree delete: their keys merge as deletes. A member whose keys do not ascend is an
    IntegrityError. Any error poisons the merge (and the reader or writer it came from)."""

    def __init__(self, readers: list[BackupReader], *, stale: int = 0) -> None: ...
    def read_items(self, max_items: int = 4096, max_bytes: int = 16 << 20) -> list[tuple[bytes, bytes | None]]:
        """The merged state in key order, as BackupReader.read_items: (key, value) where the
        newest member holds a PUT, (key, None) where it holds a DELETE. [] at the end, once every
        member's TREE_END was read and checked."""
    def skip_items(self, max_items: int = 4096, max_bytes: int = 16 << 20) -> int:
        """read_items without the records: merges up to max_items keys (fewer once their keys and
        values reach max_bytes) and returns how many; 0 at the end, once every member's TREE_END
        was read and checked."""
    def write_items(
        self, writer: LmdbWriter, tree: int, *, prefix: bytes | None = None, overwrite: bool, max_items: int = 65536
    ) -> tuple[int, int, int, list[bytes], bool]:
        """Rust core only: BackupReader.write_items for the merged state (PUT where the newest
        member holds one, DELETE where it deletes the key)."""
    def diff(self, items: Iterable[tuple[Buffer, Buffer]], writer: BackupWriter) -> int:
        """Consumes the database's next (key, value) pairs (strictly ascending keys, across calls
        too) and writes to `writer`'s open tree, in key order, the records that turn the chain's
        state into the database's: PUT for new and changed keys, DELETE for keys the chain holds
        that the database lacks (up to the last key given). Returns the records written."""
    def finish_diff(self, writer: BackupWriter) -> int:
        """After the database's last item: DELETE records for the keys the chain still holds."""

# --- store helper -----------------------------------------------------------------------------
def take_batch(pairs: Iterable[tuple[Buffer, Buffer]], max_items: int, max_bytes: int) -> tuple[list, bool]:
    """The next batch of a store's (key, value) iterator: at most max_items pairs, ending once
    their keys and values reach max_bytes; and whether the iterator may hold more. (The stores'
    snapshot batches; the Rust core runs no bytecode per record.)"""

def plain_pairs(items: object, max_key: int) -> bool:
    """True for a non-empty list (exactly a list) of 2-tuples of bytes (exact types) whose keys
    are 1..max_key bytes long: a batch a store may hand to its C loop without checking each pair."""

def keys_ascending(items: object, after: bytes | None = None) -> bool:
    """True when the pairs of `items` (a list) have bytes keys in strictly ascending byte order,
    every one after `after` (None: no bound): a batch LMDB can append (MDB_APPEND) at a tree's end.
    False for anything else (not a list, a pair that is not a 2-tuple with a bytes key)."""

# --- LMDB direct reads (the lmdb store's snapshots) ------------------------------------------
# Rust core only: a store accelerator, not part of the shared interface. Without it (the pure
# core selected, or no extension) the lmdb store reads through py-lmdb.
class RecordBatch(Sequence[tuple[bytes, bytes]]):
    """Records copied out of an LMDB data file into one buffer, framed as a backup's PUT records:
    a read-only sequence of (key, value) pairs. BackupWriter.add_items (which appends runs of the
    framed records whole), digest_batches and ChainMerge.diff read it without a Python object per
    record. Once no one holds it, its buffer is reused for a later batch of the same file."""

    @property
    def nbytes(self) -> int: ...  # bytes of keys and values
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[bytes, bytes]: ...  # type: ignore[override]  # no slices
    def __iter__(self) -> Iterator[tuple[bytes, bytes]]: ...

class LmdbScan:
    """A walk over one tree's records in key order (from the first key >= a prefix while keys
    start with it). The caller keeps the read transaction it took the tree's record in open."""

    def take(self, max_items: int, max_bytes: int) -> RecordBatch | None:
        """The next batch, or None at the end; reads without the GIL. StoreError if a page is
        damaged (the scan is over then)."""

class LmdbDataFile:
    """A read-only map of an LMDB environment's data.mdb (src/lmdb_file.rs). It opens no LMDB
    environment and takes no lock; reading is safe only inside a read transaction that keeps
    the tree's pages in place."""

    def __init__(self, path: str | os.PathLike[str]) -> None: ...
    @property
    def version(self) -> int: ...  # the data format version (1: LMDB 0.9, the one scan() reads)
    @property
    def page_size(self) -> int: ...
    @property
    def identity(self) -> tuple[int, int]: ...  # (st_dev, st_ino) of the mapped file
    def scan(self, db_record: Buffer, prefix: Buffer | None = None) -> LmdbScan:
        """A scan of the tree whose 48-byte record (its value in the main database) is db_record."""

class LmdbWriter:
    """An LMDB environment opened by the core's own LMDB (src/lmdb_write.rs) with one write
    transaction, which BackupReader.write_items fills. Only the lmdb store makes one, after it has
    closed its py-lmdb environment (two LMDB builds must not have one environment open in one
    process). Bound to the thread that made it (any other thread gets a StoreError; once closed it
    may be freed anywhere); leaving it uncommitted rolls back.

    Staged: when the environment holds no tree, no other process has it open and writemap is off,
    the records go into a new file, STAGING_FILE in the directory, committed every 16 MiB (memory
    stays flat), which commit() syncs and renames over data.mdb with data.mdb's permissions, owner
    and extended attributes (copied when the file is created; where one cannot be, not staged).
    stage_writemap: that file is written through its map (MDB_WRITEMAP), allocated ahead of LMDB's
    pages (posix_fallocate: a full disk is a StoreError, never a SIGBUS) and cut to the pages in use
    at the end; for large values, whose pages LMDB would otherwise malloc and then copy."""

    STAGING_FILE: str  # "data.mdb.datafold-restore"

    def __init__(
        self,
        path: bytes,
        *,
        map_size: int,
        max_dbs: int,
        max_readers: int,
        writemap: bool,
        stage_when_empty: bool = True,
        stage_writemap: bool = False,
    ) -> None:
        """Opens the environment directory path (os.fsencode); StoreError if LMDB refuses, as it does
        when another process has the environment open (py-lmdb's lock file format differs). Waits
        while another LmdbWriter (of any process) has it, as LMDB writers wait for each other."""
    def open_tree(self, name: str) -> tuple[int, bool]:
        """Opens (creates) a tree: (its index for write_items, whether it had no record)."""
    @property
    def records(self) -> int: ...  # records put or deleted so far (skipped ones not counted)
    @property
    def committed(self) -> bool: ...
    @property
    def staged(self) -> bool: ...  # the records go to STAGING_FILE (see above); fixed at open
    @property
    def max_key_size(self) -> int: ...
    def seal(self) -> None:
        """Staged writes only (InvalidArgumentError otherwise): commits the last records to the
        new file and starts its fsync in a background thread; nothing more can be written.
        tree_digests() then reads the file while it syncs; commit() waits for the sync."""
    def tree_digests(
        self, indices: Sequence[int], backup_key: Buffer, *, threads: int = 0
    ) -> list[tuple[int, int, bytes]]:
        """[digest_items(backup_key, records) of tree i for i in indices] (from open_tree) as the
        sealed new file holds them, read back through the core's LMDB before commit() publishes
        the file; up to `threads` trees at once (0: all cores), each in a read transaction of its
        own on a thread of its own."""
    def commit(self) -> None:
        """Commits durably (fsync; staged: the new file synced, after seal() if that was not
        called, and renamed over data.mdb, the directory synced) and closes the environment;
        StoreError after a failed write."""
    def close(self) -> None:
        """Rolls back unless committed, and closes the environment; idempotent."""
