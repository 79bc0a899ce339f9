//! The embedded store's files: a snapshot of the whole state plus a write-ahead log of
//! the group commits after it, the way etcd persists (WAL + snapshot).
//!
//! - `store.lock`: held with an exclusive `flock` while the store is open, so a second
//!   open of the same directory (in this process or another) fails.
//! - `store.snap`: `FERRYSNP`, format version (u32), the body, then a trailer: the body's
//!   length (u64) and CRC32 (u32). The body: seq (u64: the last log record it covers),
//!   revision, next lease id, the leases (count, then id + TTL in ms each) and the keys
//!   (count, then one kv entry each). Written to `store.snap.tmp`, fsync'd, renamed over
//!   the old one, directory fsync'd: it is either the old or the new one, never torn.
//! - `store.wal`: `FERRYWAL`, format version (u32), then one record per group commit:
//!   body length (u64), CRC32 of the body (u32), body. The body: seq (u64, one more than
//!   the previous record's), revision and next lease id after the commit, the keys
//!   changed (count, then a kv entry each: 1 + the new value, or 0 + key for a
//!   deletion), the leases changed (count, then id and 1 + TTL ms granted, or 0 revoked).
//!   A record is written with one `write` and fdatasync'd before the commit is made
//!   visible or acknowledged.
//!
//! All integers are little-endian; a kv entry is tag (u8), key length (u64), key, and for
//! a put create/mod revision, version, lease (i64 each), value length (u64), value.
//!
//! Recovery: load the snapshot (if any), then replay the log's records in order,
//! skipping those the snapshot already covers (seq ≤ its seq). The first record that is
//! incomplete or fails its CRC ends the log if nothing valid follows it: it is a torn
//! write that was never acknowledged, and is truncated away. If a valid record does
//! follow it (or the seqs have a gap), acknowledged data is damaged and the open fails
//! with [`StoreError::Corrupt`].
//!
//! Compaction: when the log grows past max(`compact_log_bytes`, 2 × the last snapshot),
//! the writer writes a new snapshot as above, then truncates the log to its header.
//! A crash in between leaves old records that the new snapshot covers: skipped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{KeyValue, LeaseId, Result, Revision, StoreError};

pub(super) const LOCK_FILE: &str = "store.lock";
pub(super) const SNAPSHOT_FILE: &str = "store.snap";
pub(super) const LOG_FILE: &str = "store.wal";
const SNAPSHOT_TMP: &str = "store.snap.tmp";
/// The file of the format before this one.
const REDB_FILE: &str = "store.redb";

const SNAPSHOT_MAGIC: &[u8; 8] = b"FERRYSNP";
const LOG_MAGIC: &[u8; 8] = b"FERRYWAL";
const VERSION: u32 = 1;
/// Magic and version.
const FILE_HEADER: usize = 12;
/// A record's body length (u64) and CRC32 (u32).
const FRAME_HEADER: usize = 12;
/// The smallest body: seq, revision, next lease, two counts.
const MIN_BODY: usize = 8 * 5;
/// A snapshot's trailer: body length (u64), CRC32 (u32).
const TRAILER: usize = 12;

const PUT: u8 = 1;
const DELETE: u8 = 0;
const GRANT: u8 = 1;
const REVOKE: u8 = 0;

fn io_at(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_at("fsync", dir, e))
}

/// What the files hold: the state as of the last acknowledged commit.
pub(super) struct Loaded {
    pub revision: Revision,
    pub next_lease: LeaseId,
    pub kvs: BTreeMap<String, KeyValue>,
    /// Lease id → TTL.
    pub leases: BTreeMap<LeaseId, Duration>,
}

/// The open files; owned by the writer thread.
pub(super) struct Files {
    dir: PathBuf,
    /// Held (locked) for as long as the store is open.
    _lock: File,
    /// Opened for appending.
    log: File,
    log_len: u64,
    /// The seq of the last record written (or covered by the snapshot).
    seq: u64,
    /// The log is compacted when it grows past this.
    compact_at: u64,
    compact_log_bytes: u64,
    /// Reused for encoding records.
    buf: Vec<u8>,
    /// Set when a log write failed: the log's tail is unknown, so no more writes.
    failed: Option<StoreError>,
}

// ---------------------------------------------------------------- encoding

fn put_u64(b: &mut Vec<u8>, n: u64) {
    b.extend_from_slice(&n.to_le_bytes());
}

fn put_i64(b: &mut Vec<u8>, n: i64) {
    b.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    put_u64(b, s.len() as u64);
    b.extend_from_slice(s);
}

/// A put entry's fields after the tag and key.
fn put_kv_fields(b: &mut Vec<u8>, kv: &KeyValue) {
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        put_i64(b, n);
    }
    put_bytes(b, &kv.value);
}

/// Reads what the encoders above wrote; every shortfall is [`StoreError::Corrupt`].
struct Reader<'a> {
    b: &'a [u8],
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(StoreError::Corrupt(format!(
                "{}: truncated entry",
                self.what
            )));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn i64(&mut self) -> Result<i64> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(a))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.b.len())
            .ok_or_else(|| StoreError::Corrupt(format!("{}: bad length {n}", self.what)))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec())
            .map_err(|_| StoreError::Corrupt(format!("{}: key is not UTF-8", self.what)))
    }

    /// A put entry's fields after the tag and key.
    fn kv_fields(&mut self, key: String) -> Result<KeyValue> {
        Ok(KeyValue {
            key,
            create_revision: self.i64()?,
            mod_revision: self.i64()?,
            version: self.i64()?,
            lease: self.i64()?,
            value: self.bytes()?.to_vec(),
        })
    }

    fn count(&mut self) -> Result<u64> {
        self.u64()
    }
}

/// A valid record frame at `at`: its body and where it ends. None: no complete frame
/// with a matching CRC there.
fn frame_at(log: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = log.get(at..at.checked_add(FRAME_HEADER)?)?;
    let mut len = [0; 8];
    len.copy_from_slice(&header[..8]);
    let len = usize::try_from(u64::from_le_bytes(len)).ok()?;
    let mut crc = [0; 4];
    crc.copy_from_slice(&header[8..]);
    if len < MIN_BODY {
        return None;
    }
    let start = at + FRAME_HEADER;
    let end = start.checked_add(len)?;
    let body = log.get(start..end)?;
    (crc32fast::hash(body) == u32::from_le_bytes(crc)).then_some((body, end))
}

fn seq_of(body: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&body[..8]);
    u64::from_le_bytes(a)
}

// ---------------------------------------------------------------- open and recover

impl Files {
    /// Locks `dir`, loads the snapshot, replays the log (truncating a torn tail) and
    /// opens the log for appending.
    pub(super) fn open(dir: &Path, compact_log_bytes: u64) -> Result<(Self, Loaded)> {
        std::fs::create_dir_all(dir).map_err(|e| io_at("create", dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_at("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io_at(
                    "open",
                    dir,
                    "the store is already open (in this process or another)",
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_at("lock", &lock_path, e)),
        }

        let snap_path = dir.join(SNAPSHOT_FILE);
        let log_path = dir.join(LOG_FILE);
        let redb = dir.join(REDB_FILE);
        if redb.exists() && !snap_path.exists() && !log_path.exists() {
            return Err(StoreError::Io(format!(
                "{} is in the old store format (redb), which this version no longer reads: \
                 the embedded store now keeps a write-ahead log and snapshots \
                 ({LOG_FILE}, {SNAPSHOT_FILE}). Move the directory away to start empty.",
                redb.display()
            )));
        }
        // A snapshot being written when the process stopped; the old one is intact.
        let _ = std::fs::remove_file(dir.join(SNAPSHOT_TMP));

        let (mut seq, mut loaded, snapshot_len) = match std::fs::read(&snap_path) {
            Ok(b) => {
                let (seq, loaded) = decode_snapshot(&b, &snap_path)?;
                (seq, loaded, b.len() as u64)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                0,
                Loaded {
                    revision: 0,
                    next_lease: 1,
                    kvs: BTreeMap::new(),
                    leases: BTreeMap::new(),
                },
                0,
            ),
            Err(e) => return Err(io_at("read", &snap_path, e)),
        };

        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(|e| io_at("open", &log_path, e))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)
            .map_err(|e| io_at("read", &log_path, e))?;
        let valid_len = if bytes.len() < FILE_HEADER {
            // New, or created by an open that stopped before its header was synced: no
            // record can have been acknowledged.
            log.set_len(0)
                .and_then(|()| log.write_all(&file_header(LOG_MAGIC)))
                .and_then(|()| log.sync_all())
                .map_err(|e| io_at("create", &log_path, e))?;
            fsync_dir(dir)?;
            FILE_HEADER
        } else {
            check_header(&bytes, LOG_MAGIC, &log_path)?;
            let end = replay(&bytes, &log_path, &mut seq, &mut loaded)?;
            if end < bytes.len() {
                tracing::warn!(
                    path = %log_path.display(),
                    offset = end,
                    dropped = bytes.len() - end,
                    "embedded store: truncating a torn log tail (an unacknowledged commit)"
                );
                log.set_len(end as u64)
                    .and_then(|()| log.sync_all())
                    .map_err(|e| io_at("truncate", &log_path, e))?;
            }
            end
        };

        let mut files = Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            log,
            log_len: valid_len as u64,
            seq,
            compact_at: 0,
            compact_log_bytes,
            buf: Vec::new(),
            failed: None,
        };
        files.set_compact_at(snapshot_len);
        Ok((files, loaded))
    }

    fn set_compact_at(&mut self, snapshot_len: u64) {
        self.compact_at = self
            .compact_log_bytes
            .max(snapshot_len.saturating_mul(2))
            .saturating_add(FILE_HEADER as u64);
    }
}

fn file_header(magic: &[u8; 8]) -> [u8; FILE_HEADER] {
    let mut h = [0; FILE_HEADER];
    h[..8].copy_from_slice(magic);
    h[8..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn check_header(b: &[u8], magic: &[u8; 8], path: &Path) -> Result<()> {
    if b.get(..FILE_HEADER) != Some(&file_header(magic)[..]) {
        return Err(StoreError::Corrupt(format!(
            "{}: not a Ferry store file of format version {VERSION}",
            path.display()
        )));
    }
    Ok(())
}

fn decode_snapshot(b: &[u8], path: &Path) -> Result<(u64, Loaded)> {
    check_header(b, SNAPSHOT_MAGIC, path)?;
    let corrupt = |m: &str| StoreError::Corrupt(format!("{}: {m}", path.display()));
    let body_end = b
        .len()
        .checked_sub(TRAILER)
        .filter(|e| *e >= FILE_HEADER)
        .ok_or_else(|| corrupt("too short"))?;
    let body = &b[FILE_HEADER..body_end];
    let mut t = Reader {
        b: &b[body_end..],
        what: "snapshot trailer",
    };
    let len = t.u64()?;
    let mut crc = [0; 4];
    crc.copy_from_slice(t.take(4)?);
    if len != body.len() as u64 || crc32fast::hash(body) != u32::from_le_bytes(crc) {
        return Err(corrupt("length or checksum mismatch"));
    }
    let what = path.display().to_string();
    let mut r = Reader {
        b: body,
        what: &what,
    };
    let seq = r.u64()?;
    let revision = r.i64()?;
    let next_lease = r.i64()?;
    let mut leases = BTreeMap::new();
    for _ in 0..r.count()? {
        let id = r.i64()?;
        leases.insert(id, Duration::from_millis(r.u64()?));
    }
    let mut kvs = BTreeMap::new();
    for _ in 0..r.count()? {
        let key = r.string()?;
        let kv = r.kv_fields(key.clone())?;
        kvs.insert(key, kv);
    }
    if !r.b.is_empty() {
        return Err(corrupt("trailing bytes in the body"));
    }
    Ok((
        seq,
        Loaded {
            revision,
            next_lease,
            kvs,
            leases,
        },
    ))
}

/// Applies the log's valid records after the snapshot's `seq` to `st`; returns where the
/// valid log ends (the rest is a torn tail).
fn replay(log: &[u8], path: &Path, seq: &mut u64, st: &mut Loaded) -> Result<usize> {
    let mut at = FILE_HEADER;
    // The seq of the last record seen (applied or covered by the snapshot).
    let mut last: Option<u64> = None;
    while at < log.len() {
        let Some((body, end)) = frame_at(log, at) else {
            // Torn, unless an intact record follows: then an acknowledged one is damaged.
            // A later record has a larger seq; look for one at every offset (cheap: most
            // offsets fail the length or seq check before the CRC).
            let after = last.unwrap_or(*seq);
            let remaining = log.len() - at;
            let plausible = |s: u64| s > after && s - after <= (remaining / MIN_BODY) as u64 + 1;
            if let Some(q) = (at + 1..log.len()).find(|&q| {
                log.get(q + FRAME_HEADER..q + FRAME_HEADER + 8)
                    .is_some_and(|s| plausible(seq_of(s)))
                    && frame_at(log, q).is_some()
            }) {
                return Err(StoreError::Corrupt(format!(
                    "{}: the log record at byte {at} is damaged but intact records follow \
                     (at byte {q}); refusing to open, as acknowledged commits would be lost",
                    path.display()
                )));
            }
            return Ok(at);
        };
        let rec_seq = seq_of(body);
        if let Some(prev) = last
            && rec_seq != prev + 1
        {
            return Err(StoreError::Corrupt(format!(
                "{}: log record at byte {at} has seq {rec_seq} after {prev}",
                path.display()
            )));
        }
        last = Some(rec_seq);
        if rec_seq > *seq {
            if rec_seq != *seq + 1 {
                return Err(StoreError::Corrupt(format!(
                    "{}: the log starts at seq {rec_seq} but the snapshot ends at {}: \
                     commits are missing",
                    path.display(),
                    *seq
                )));
            }
            apply_record(body, path, at, st)?;
            *seq = rec_seq;
        }
        at = end;
    }
    Ok(at)
}

fn apply_record(body: &[u8], path: &Path, at: usize, st: &mut Loaded) -> Result<()> {
    let what = format!("{}: log record at byte {at}", path.display());
    let mut r = Reader {
        b: body,
        what: &what,
    };
    let _seq = r.u64()?;
    st.revision = r.i64()?;
    st.next_lease = r.i64()?;
    for _ in 0..r.count()? {
        let tag = r.u8()?;
        let key = r.string()?;
        match tag {
            PUT => {
                let kv = r.kv_fields(key.clone())?;
                st.kvs.insert(key, kv);
            }
            DELETE => {
                st.kvs.remove(&key);
            }
            t => return Err(StoreError::Corrupt(format!("{what}: bad kv tag {t}"))),
        }
    }
    for _ in 0..r.count()? {
        let id = r.i64()?;
        match r.u8()? {
            GRANT => {
                st.leases.insert(id, Duration::from_millis(r.u64()?));
            }
            REVOKE => {
                st.leases.remove(&id);
            }
            t => return Err(StoreError::Corrupt(format!("{what}: bad lease tag {t}"))),
        }
    }
    if !r.b.is_empty() {
        return Err(StoreError::Corrupt(format!("{what}: trailing bytes")));
    }
    Ok(())
}

// ---------------------------------------------------------------- writing

impl Files {
    /// Appends one group commit as one record and fdatasyncs it. After a failure every
    /// later append fails too (the log's tail is unknown until the store is reopened,
    /// which truncates a torn record).
    pub(super) fn append(
        &mut self,
        revision: Revision,
        next_lease: LeaseId,
        kvs: &BTreeMap<String, Option<Arc<KeyValue>>>,
        leases: &BTreeMap<LeaseId, Option<Duration>>,
    ) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(&[0; FRAME_HEADER]);
        put_u64(b, self.seq + 1);
        put_i64(b, revision);
        put_i64(b, next_lease);
        put_u64(b, kvs.len() as u64);
        for (key, new) in kvs {
            match new {
                Some(kv) => {
                    b.push(PUT);
                    put_bytes(b, key.as_bytes());
                    put_kv_fields(b, kv);
                }
                None => {
                    b.push(DELETE);
                    put_bytes(b, key.as_bytes());
                }
            }
        }
        put_u64(b, leases.len() as u64);
        for (id, granted) in leases {
            put_i64(b, *id);
            match granted {
                Some(ttl) => {
                    b.push(GRANT);
                    put_u64(b, ttl_ms(*ttl));
                }
                None => b.push(REVOKE),
            }
        }
        let body_len = (b.len() - FRAME_HEADER) as u64;
        let crc = crc32fast::hash(&b[FRAME_HEADER..]);
        b[..8].copy_from_slice(&body_len.to_le_bytes());
        b[8..FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());

        if let Err(e) = self.log.write_all(b).and_then(|()| self.log.sync_data()) {
            let e = io_at("append to", &self.dir.join(LOG_FILE), e);
            self.failed = Some(StoreError::Io(format!(
                "a write to the log failed earlier; reopen the store ({e})"
            )));
            return Err(e);
        }
        self.log_len += b.len() as u64;
        self.seq += 1;
        // Don't keep a huge buffer after a huge batch.
        if b.capacity() > 16 << 20 {
            *b = Vec::new();
        }
        Ok(())
    }

    /// Whether the log has grown enough to be compacted into a snapshot.
    pub(super) fn wants_compaction(&self) -> bool {
        self.failed.is_none() && self.log_len > self.compact_at
    }

    /// Writes a snapshot of the committed state (which must include every record
    /// appended so far) and restarts the log. On failure the log is left as it was (and
    /// goes on being appended to); the next attempt waits for the log to grow by another
    /// threshold.
    pub(super) fn compact<'a>(
        &mut self,
        revision: Revision,
        next_lease: LeaseId,
        kvs: impl ExactSizeIterator<Item = &'a KeyValue>,
        leases: impl ExactSizeIterator<Item = (LeaseId, Duration)>,
    ) -> Result<()> {
        let snapshot_len = match self.write_snapshot(revision, next_lease, kvs, leases) {
            Ok(n) => n,
            Err(e) => {
                self.compact_at = self.log_len.saturating_add(self.compact_log_bytes);
                return Err(e);
            }
        };
        self.set_compact_at(snapshot_len);
        // The snapshot covers every record: restart the log. A crash before this leaves
        // records that replay skips (seq ≤ the snapshot's).
        let path = self.dir.join(LOG_FILE);
        self.log
            .set_len(FILE_HEADER as u64)
            .and_then(|()| self.log.sync_data())
            .map_err(|e| io_at("truncate", &path, e))?;
        self.log_len = FILE_HEADER as u64;
        Ok(())
    }

    /// Writes and installs the snapshot; returns its size.
    fn write_snapshot<'a>(
        &mut self,
        revision: Revision,
        next_lease: LeaseId,
        kvs: impl ExactSizeIterator<Item = &'a KeyValue>,
        leases: impl ExactSizeIterator<Item = (LeaseId, Duration)>,
    ) -> Result<u64> {
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let file = File::create(&tmp).map_err(|e| io_at("create", &tmp, e))?;
        let mut w = SnapshotWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            len: 0,
            b: Vec::new(),
        };
        let wr = |e| io_at("write", &tmp, e);
        w.out.write_all(&file_header(SNAPSHOT_MAGIC)).map_err(wr)?;
        put_u64(&mut w.b, self.seq);
        put_i64(&mut w.b, revision);
        put_i64(&mut w.b, next_lease);
        put_u64(&mut w.b, leases.len() as u64);
        for (id, ttl) in leases {
            put_i64(&mut w.b, id);
            put_u64(&mut w.b, ttl_ms(ttl));
        }
        put_u64(&mut w.b, kvs.len() as u64);
        for kv in kvs {
            put_bytes(&mut w.b, kv.key.as_bytes());
            put_kv_fields(&mut w.b, kv);
            if w.b.len() >= 64 << 10 {
                w.flush_body().map_err(wr)?;
            }
        }
        w.flush_body().map_err(wr)?;
        let mut trailer = Vec::with_capacity(TRAILER);
        put_u64(&mut trailer, w.len);
        trailer.extend_from_slice(&w.crc.finalize().to_le_bytes());
        w.out.write_all(&trailer).map_err(wr)?;
        let file = w.out.into_inner().map_err(|e| wr(e.into_error()))?;
        file.sync_all().map_err(|e| io_at("fsync", &tmp, e))?;
        let size = FILE_HEADER as u64 + w.len + TRAILER as u64;
        drop(file);
        let path = self.dir.join(SNAPSHOT_FILE);
        std::fs::rename(&tmp, &path).map_err(|e| io_at("rename to", &path, e))?;
        fsync_dir(&self.dir)?;
        Ok(size)
    }
}

/// Streams a snapshot's body through a CRC.
struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    len: u64,
    /// Encoded body not yet written.
    b: Vec<u8>,
}

impl SnapshotWriter {
    fn flush_body(&mut self) -> std::io::Result<()> {
        self.crc.update(&self.b);
        self.len += self.b.len() as u64;
        self.out.write_all(&self.b)?;
        self.b.clear();
        Ok(())
    }
}
