//! Step 3 of a restore: write the files, each rebuilt from its chain of
//! backups and checked as it is written, in parallel units.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::chain::{ChainFiles, Layered};
use super::*;
use crate::codec::Compress;
use crate::crypto::{unsealing, Cipher};
use crate::error::{Error, Result};
use crate::pg::CONTROL_FILE;
use crate::progress::Progress;
use crate::repo::manifest::Piece;
use crate::repo::{pages, FileEntry, Manifest, Repository};
use crate::storage::ObjectReader;
use crate::workers::Workers;

/// Whether `dest` has the size of `f` and holds, over `range`, the bytes
/// whose BLAKE3 is `expect`.
pub(super) fn same_range(dest: &Path, f: &FileEntry, range: &Range<u64>, expect: &str, buf: &mut [u8]) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let file = match std::fs::File::open(dest) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() || file.metadata()?.len() != f.size {
        return Ok(false);
    }
    let mut hasher = blake3::Hasher::new();
    let mut at = range.start;
    while at < range.end {
        let n = buf.len().min((range.end - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize().to_hex().as_str() == expect)
}

/// One unit of a restore: a byte range of a file, rebuilt from the
/// pieces of its layers that cover it, oldest first.
pub(super) struct Unit {
    pub(super) file: FileEntry,
    pub(super) range: Range<u64>,
    pub(super) pieces: Vec<(Piece, Compress)>,
    /// BLAKE3 of the range's bytes in the backup, when one piece of the
    /// file itself covers exactly the range (`restore --delta` compares).
    pub(super) expect: Option<String>,
}

/// The units that restore `f`: one per part for a file stored in parts,
/// else the whole file. Every piece overlapping a unit's range is read
/// whole (and checked) by that unit; only the bytes in the range are
/// written.
pub(super) fn restore_units(f: &FileEntry, layers: &[(&FileEntry, Compress)]) -> Vec<Unit> {
    let mut starts: Vec<u64> = f.parts.iter().map(|p| p.start).filter(|s| *s < f.size).collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    let own = f.pieces();
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let range = start..starts.get(k + 1).copied().unwrap_or(f.size);
            let pieces = layers
                .iter()
                .flat_map(|(e, c)| e.pieces().into_iter().map(move |p| (p, *c)))
                .filter(|(p, _)| p.start < range.end && p.start + p.size > range.start)
                .collect();
            let expect = own.iter().find(|p| p.start == range.start && p.start + p.size == range.end).map(|p| p.content.clone());
            Unit { file: f.clone(), range, pieces, expect }
        })
        .collect()
}

/// The order units go to the workers: files in list order, but the units
/// of files restored in parts round-robin over up to `jobs` of them at a
/// time, so that two workers seldom write one file (they contend in the
/// kernel), while a file of one unit goes as soon as it is read. Pure.
pub(super) struct Schedule<T> {
    jobs: usize,
    parted: VecDeque<VecDeque<T>>,
    ready: VecDeque<T>,
}

impl<T> Schedule<T> {
    pub(super) fn new(jobs: usize) -> Self {
        Schedule { jobs: jobs.max(1), parted: VecDeque::new(), ready: VecDeque::new() }
    }

    /// Whether the next file should be added before a unit is taken:
    /// nothing of one unit waits, and fewer than `jobs` files in parts are
    /// open.
    pub(super) fn wants_more(&self) -> bool {
        self.ready.is_empty() && self.parted.len() < self.jobs
    }

    /// Adds the units of the next file.
    pub(super) fn add(&mut self, units: Vec<T>) {
        match units.len() {
            0 => {}
            1 => self.ready.extend(units),
            _ => self.parted.push_back(units.into()),
        }
    }

    /// The next unit to give a worker.
    pub(super) fn take(&mut self) -> Option<T> {
        if let Some(u) = self.ready.pop_front() {
            return Some(u);
        }
        let mut file = self.parted.pop_front()?;
        let u = file.pop_front();
        if !file.is_empty() {
            self.parted.push_back(file);
        }
        u
    }
}

/// Creates (or, for a delta restore, keeps) a file restored in parts, at
/// its final size and mode, before its parts are written.
pub(super) fn prepare_parted(dest: &Path, f: &FileEntry, delta: bool) -> Result<()> {
    let what = || format!("cannot create {}", dest.display());
    let file = std::fs::OpenOptions::new().create(true).write(true).truncate(!delta).open(dest).map_err(Error::io(what()))?;
    if file.metadata().map_err(Error::io(what()))?.len() != f.size {
        file.set_len(f.size).map_err(Error::io(what()))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))
}

pub(super) fn tablespace_link<'a>(path: &str, map: &'a [(u32, PathBuf)]) -> Option<(u32, &'a PathBuf)> {
    let oid = path.strip_prefix("pg_tblspc/")?;
    map.iter().find(|(o, _)| o.to_string() == oid).map(|(o, d)| (*o, d))
}

/// Where a restore reads stored objects from, and how to decrypt them.
#[derive(Clone)]
pub(crate) struct Source {
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Handle,
    cipher: Option<Cipher>,
    repo_no: usize,
}

impl Source {
    /// Reading from `repo`, driving I/O on the current runtime.
    pub(crate) fn new(repo: &Repository) -> Source {
        Source {
            store: repo.store().object_store(),
            rt: tokio::runtime::Handle::current(),
            cipher: repo.cipher.clone(),
            repo_no: repo.number,
        }
    }

    /// The bytes `range` of object `key`, read whole (call from a blocking
    /// thread).
    pub(crate) fn read_range(&self, key: &str, range: Range<u64>) -> Result<bytes::Bytes> {
        use object_store::ObjectStoreExt;
        let path = object_store::path::Path::from(key);
        self.rt
            .block_on(self.store.get_range(&path, range))
            .map_err(|e| Error::Io { what: format!("cannot read {}", self.object(key)), cause: std::io::Error::other(e) })
    }

    /// How messages name object `key`.
    fn object(&self, key: &str) -> String {
        format!("stored object '{key}' in repo {}", self.repo_no)
    }
}

/// What a restore or verify worker keeps from one piece to the next: its
/// read buffer and decompression context.
pub(crate) struct Scratch {
    buf: Vec<u8>,
    contexts: crate::codec::Contexts,
    /// What `restore --delta` reads of a file to compare before writing.
    local: Vec<u8>,
    /// The bundle ranges of the batch in hand (see [`Span`]).
    spans: Vec<Span>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { buf: vec![0u8; 1 << 20], contexts: Default::default(), local: Vec::new(), spans: Vec::new() }
    }
}

/// A range of one bundle that holds the pieces of several small files of
/// a batch, read in one request when the first of them is needed (a
/// `restore --delta` that keeps every file of the batch reads nothing):
/// on an object store, one request per file would cost a round trip per
/// file.
pub(crate) struct Span {
    key: String,
    range: Range<u64>,
    /// Not read yet; then what was read, or `None` when the read failed or
    /// came back short (each piece is then read on its own, so that a
    /// failure names its file).
    bytes: Option<Option<bytes::Bytes>>,
}

/// The most of a bundle one [`Span`] reads.
const SPAN_MAX: u64 = 16 << 20;

/// The spans of `pieces` worth reading at once: per bundle, the range that
/// holds two or more of its pieces, when at most [`SPAN_MAX`].
fn spans_of<'p>(pieces: impl Iterator<Item = &'p Piece>) -> Vec<Span> {
    let mut by_key: std::collections::BTreeMap<&str, (Range<u64>, usize)> = Default::default();
    for p in pieces {
        if let (Some(key), Some(r)) = (p.key.as_deref(), &p.range) {
            let e = by_key.entry(key).or_insert((r.clone(), 0));
            e.0 = e.0.start.min(r.start)..e.0.end.max(r.end);
            e.1 += 1;
        }
    }
    by_key
        .into_iter()
        .filter(|(_, (r, n))| *n > 1 && r.end - r.start <= SPAN_MAX)
        .map(|(key, (range, _))| Span { key: key.to_owned(), range, bytes: None })
        .collect()
}

/// `range` of bundle `key` from a span of `spans` that holds it, read now
/// if it was not yet; `None` when no span holds it or its read failed.
fn from_spans(source: &Source, spans: &mut [Span], key: &str, range: &Range<u64>) -> Option<bytes::Bytes> {
    let span = spans.iter_mut().find(|s| s.key == key && s.range.start <= range.start && range.end <= s.range.end)?;
    let bytes = span.bytes.get_or_insert_with(|| {
        source.read_range(key, span.range.clone()).ok().filter(|b| b.len() as u64 == span.range.end - span.range.start)
    });
    let from = (range.start - span.range.start) as usize;
    Some(bytes.as_ref()?.slice(from..from + (range.end - range.start) as usize))
}

/// A reader that hashes what passes through it.
pub(super) struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Reads one stored piece of the file at `path`, checking its checksum
/// (and a whole piece's size), and hands what it holds to `out` as (file
/// offset, bytes): the file's bytes in order, or a delta's pages. Errors
/// name the object; nothing handed out is trustworthy until this returns
/// `Ok`.
pub(crate) fn read_piece(
    source: &Source,
    piece: &Piece,
    compress: Compress,
    path: &str,
    scratch: &mut Scratch,
    out: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let Some(key) = &piece.key else { return Ok(()) };
    if let Some(bytes) = piece.range.as_ref().and_then(|r| from_spans(source, &mut scratch.spans, key, r)) {
        return read_stored(source, &bytes[..], piece, compress, path, scratch, out);
    }
    let reader = ObjectReader::open(source.store.clone(), key, piece.range.clone(), source.rt.clone())
        .map_err(Error::storage(format!("cannot read {}", source.object(key))))?;
    read_stored(source, reader, piece, compress, path, scratch, out)
}

/// [`read_piece`] from `reader`, which gives the piece's stored bytes
/// (its object, or its range of a bundle).
pub(crate) fn read_stored(
    source: &Source,
    reader: impl Read + Send,
    piece: &Piece,
    compress: Compress,
    path: &str,
    scratch: &mut Scratch,
    mut out: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let key = piece.key.as_deref().unwrap_or_default();
    let object = source.object(key);
    let corrupt = |e: std::io::Error| {
        if e.get_ref().is_some_and(|i| i.is::<object_store::Error>()) {
            Error::Io { what: format!("cannot read {object}"), cause: e }
        } else {
            Error::Corrupt(format!("{object} cannot be decompressed ({e}): it is corrupt or truncated; restore another backup"))
        }
    };
    let Scratch { buf, contexts, .. } = scratch;
    let dec = compress.decoder_in(unsealing(source.cipher.as_ref(), reader).map_err(corrupt)?, contexts).map_err(corrupt)?;
    let mut src = Hashing { inner: dec, hasher: blake3::Hasher::new(), bytes: 0 };
    if piece.delta {
        while let Some(number) = pages::read_record(&mut src, buf).map_err(corrupt)? {
            out(number as u64 * pages::PAGE_SIZE as u64, buf)?;
        }
    } else {
        let mut at = piece.start;
        loop {
            let n = src.read(buf).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            out(at, &buf[..n])?;
            at += n as u64;
        }
    }
    let whole_size_ok = piece.delta || src.bytes == piece.size;
    if !whole_size_ok || src.hasher.finalize().to_hex().as_str() != piece.checksum {
        return Err(Error::Corrupt(format!(
            "{object} fails its checksum (read {} bytes for {path}): it is corrupt or truncated; restore another backup",
            src.bytes
        )));
    }
    Ok(())
}

/// Writes `data` at `at` in `out` where the file does not already hold it,
/// in runs of whole differing pages (pages of the file: at multiples of
/// 8 KiB, whatever `at`). Bytes past the file's end count as differing.
/// `local` is scratch space. Returns how many bytes it wrote.
fn write_differing(out: &std::fs::File, at: u64, data: &[u8], local: &mut Vec<u8>) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    local.resize(data.len(), 0);
    let mut have = 0;
    while have < data.len() {
        match out.read_at(&mut local[have..], at + have as u64) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // The end (in `data`) of the file page that holds data[i].
    let page_end = |i: usize| (page_of(at + i as u64 + PAGE) * PAGE - at).min(data.len() as u64) as usize;
    let same = |i: usize| {
        let end = page_end(i);
        end <= have && local[i..end] == data[i..end]
    };
    let (mut i, mut written) = (0, 0);
    while i < data.len() {
        if same(i) {
            i = page_end(i);
            continue;
        }
        let mut j = page_end(i);
        while j < data.len() && !same(j) {
            j = page_end(j);
        }
        out.write_all_at(&data[i..j], at + i as u64)?;
        written += (j - i) as u64;
        i = j;
    }
    Ok(written)
}

const PAGE: u64 = pages::PAGE_SIZE as u64;

/// The number of the file page holding byte `offset`.
fn page_of(offset: u64) -> u64 {
    offset / PAGE
}

/// `restore --delta`'s writer for one unit: the file that is there is kept
/// and only what differs from the backup is written ([`write_differing`]).
/// Pieces are put newest first; every page a delta piece gives is then
/// final, and what older pieces (and the zeros of [`InPlace::zero_gaps`])
/// have for it is skipped, so a page changed since the whole copy is
/// written at most once, with its newest bytes.
struct InPlace<'f> {
    out: &'f std::fs::File,
    range: Range<u64>,
    /// Per page of the range, from its first: final already.
    fixed: Vec<bool>,
    local: Vec<u8>,
    /// Bytes written.
    written: u64,
}

impl<'f> InPlace<'f> {
    fn new(out: &'f std::fs::File, range: Range<u64>, local: Vec<u8>) -> Self {
        let pages = if range.is_empty() { 0 } else { page_of(range.end - 1) - page_of(range.start) + 1 };
        InPlace { out, fixed: vec![false; pages as usize], range, local, written: 0 }
    }

    fn fixed(&self, offset: u64) -> bool {
        self.fixed[(page_of(offset) - page_of(self.range.start)) as usize]
    }

    /// Puts the part of `data` (at file offset `at`) inside the range, but
    /// not on fixed pages; with `fix`, the pages it gives whole (in the
    /// range) become fixed. Returns how many of its bytes are in the
    /// range.
    fn put(&mut self, at: u64, data: &[u8], fix: bool) -> std::io::Result<u64> {
        let from = at.max(self.range.start);
        let to = (at + data.len() as u64).min(self.range.end);
        let mut p = from;
        while p < to {
            let next = |q: u64| ((page_of(q) + 1) * PAGE).min(to);
            if self.fixed(p) {
                p = next(p);
                continue;
            }
            let mut q = next(p);
            while q < to && !self.fixed(q) {
                q = next(q);
            }
            self.written += write_differing(self.out, p, &data[(p - at) as usize..(q - at) as usize], &mut self.local)?;
            if fix {
                for page in page_of(p)..=page_of(q - 1) {
                    let span = (page * PAGE).max(self.range.start)..((page + 1) * PAGE).min(self.range.end);
                    if span.start >= p && span.end <= q {
                        self.fixed[(page - page_of(self.range.start)) as usize] = true;
                    }
                }
            }
            p = q;
        }
        Ok(to.saturating_sub(from))
    }

    /// Zeros what of the range no whole piece covers, up to `limit` (what a
    /// new file holds there: a restore that is not a delta starts from an
    /// empty file). Fixed pages are left as they are.
    fn zero_gaps(&mut self, pieces: &[(Piece, Compress)], limit: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let mut covered: Vec<Range<u64>> = pieces.iter().filter(|(p, _)| !p.delta).map(|(p, _)| p.start..p.start + p.size).collect();
        covered.sort_by_key(|r| r.start);
        let end = self.range.end.min(limit);
        let mut at = self.range.start;
        for r in covered.iter().chain(std::iter::once(&(end..end))) {
            while at < r.start.min(end) {
                let n = (r.start.min(end) - at).min(ZEROS.len() as u64);
                self.put(at, &ZEROS[..n as usize], false)?;
                at += n;
            }
            at = at.max(r.end);
        }
        Ok(())
    }
}

/// Restores one unit; returns true when a delta restore found the range
/// already holding the backup's bytes. Checks every piece's checksum (and
/// a whole piece's size) as it is read; writes only inside the range. A
/// whole file is created here and cut to its size; a part's file was made
/// by [`prepare_parted`]. Nothing is synced here: [`sync_written`] does,
/// once every file is written.
pub(super) fn restore_unit(
    u: &Unit,
    dest: &Path,
    source: &Source,
    progress: &Progress,
    delta: bool,
    scratch: &mut Scratch,
) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = &u.file;
    let parted = !f.parts.is_empty();
    if delta {
        if let Some(expect) = &u.expect {
            if same_range(dest, f, &u.range, expect, &mut scratch.buf).map_err(Error::io(format!("cannot read {}", dest.display())))? {
                if !parted {
                    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(f.mode & 0o7777))
                        .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))?;
                }
                progress.add_bytes(u.range.end - u.range.start);
                progress.file_done();
                return Ok(true);
            }
        }
    }
    // A delta restore keeps the file and writes only the pages that differ
    // from the backup's; any other restore writes every byte of the range.
    let out = std::fs::OpenOptions::new()
        .read(delta)
        .write(true)
        .create(!parted)
        .truncate(!parted && !delta)
        .open(dest)
        .map_err(Error::io(format!("cannot create {}", dest.display())))?;
    let write_err = || Error::io(format!("cannot write {}", dest.display()));
    if delta {
        let mut place = InPlace::new(&out, u.range.clone(), std::mem::take(&mut scratch.local));
        let read = u.pieces.iter().rev().try_for_each(|(piece, compress)| {
            read_piece(source, piece, *compress, &f.path, scratch, |at, data| {
                progress.add_bytes(place.put(at, data, piece.delta).map_err(write_err())?);
                Ok(())
            })
        });
        let limit = if parted { u64::MAX } else { out.metadata().map_err(write_err())?.len() };
        let zeroed = read.and_then(|()| place.zero_gaps(&u.pieces, limit).map_err(write_err()));
        scratch.local = place.local;
        zeroed?;
    } else {
        // Writes the part of `data` (at file offset `at`) inside the range.
        let mut write_in_range = |at: u64, data: &[u8]| -> Result<()> {
            let from = at.max(u.range.start);
            let to = (at + data.len() as u64).min(u.range.end);
            if from < to {
                out.write_all_at(&data[(from - at) as usize..(to - at) as usize], from).map_err(write_err())?;
                progress.add_bytes(to - from);
            }
            Ok(())
        };
        for (piece, compress) in &u.pieces {
            read_piece(source, piece, *compress, &f.path, scratch, &mut write_in_range)?;
        }
    }
    if !parted {
        out.set_len(f.size).map_err(write_err())?;
        out.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))?;
    }
    progress.file_done();
    Ok(false)
}

/// Syncs a directory, so that the entries created in it survive a crash.
pub(super) fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(Error::io(format!("cannot sync directory {}", path.display())))
}

/// Syncs every directory of the restored data directory (tablespace
/// directories through their links), children before parents, and the
/// data directory itself.
pub(super) fn sync_dirs(root: &Path, m: &Manifest) -> Result<()> {
    let mut dirs: Vec<&str> =
        m.dirs.iter().map(|d| d.path.as_str()).chain(crate::pg::version::wal_dirs(m.pg_version).iter().copied()).collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for d in dirs {
        sync_dir(&root.join(d))?;
    }
    sync_dir(root)
}

/// Makes every restored file durable, once all are written (PostgreSQL's
/// `--sync-method`, and `recovery_init_sync_method`, offer the same two
/// ways):
/// - `syncfs(2)` of each file system holding restored files (the data
///   directory, `pg_wal`, each tablespace), where the kernel reports
///   write-back errors to it (Linux 5.8 and later): one call that lets the
///   file system write everything in its own order, instead of waiting on
///   the disk once per file. It also writes whatever else is dirty on
///   those file systems.
/// - else `fsync(2)` of each file, `jobs` at a time.
pub(super) async fn sync_written(plan: &Plan, jobs: usize) -> Result<()> {
    let root = plan.pg_data.clone();
    let mut places: Vec<PathBuf> = vec![root.clone(), root.join("pg_wal")];
    places.extend(plan.tablespaces.iter().map(|(_, d)| d.clone()));
    if syncfs_reports_errors() {
        return tokio::task::spawn_blocking(move || {
            let mut done = std::collections::HashSet::new();
            for p in places {
                // Every place holds restored files (make_dirs created
                // pg_wal): one that cannot be opened is an error, never a
                // file system left unsynced.
                let dir = std::fs::File::open(&p).map_err(Error::io(format!("cannot open {} to sync it", p.display())))?;
                let dev = std::os::unix::fs::MetadataExt::dev(&dir.metadata().map_err(Error::io(format!("cannot read {}", p.display())))?);
                if done.insert(dev) {
                    rustix::fs::syncfs(&dir).map_err(|e| Error::io(format!("cannot sync the file system of {}", p.display()))(e.into()))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(Error::task("a restore worker"))?;
    }
    let (repo, m) = (plan.repo.clone(), plan.chain[0].clone());
    let list = tokio::task::spawn_blocking(move || repo.file_reader(&m)).await.map_err(Error::task("a restore worker"))??;
    // The list's error, if reading it fails, is kept aside: the workers
    // only see that it ended.
    let failed = Arc::new(std::sync::Mutex::new(None));
    let next = {
        let (list, failed) = (std::sync::Mutex::new(list), failed.clone());
        move || loop {
            match list.lock().ok()?.next()? {
                Ok(f) if f.path == CONTROL_FILE => continue,
                Ok(f) => return Some(root.join(&f.path)),
                Err(e) => {
                    *failed.lock().ok()? = Some(e);
                    return None;
                }
            }
        }
    };
    Workers::fed("a restore worker", jobs, next, |_: &mut (), p: &PathBuf| match std::fs::File::open(p) {
        Ok(f) => f.sync_all().map_err(Error::io(format!("cannot sync {}", p.display()))),
        Err(e) => Err(Error::io(format!("cannot sync {}", p.display()))(e)),
    })
    .collect()
    .await?;
    match failed.lock().ok().and_then(|mut f| f.take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether `syncfs(2)` returns the errors of the write-back it waits for:
/// Linux 5.8 and later (before, it always succeeded).
fn syncfs_reports_errors() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.trim().split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (5, 8)
}

pub(super) fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(Error::io(format!("cannot sync {}", path.display())))
}

pub(super) fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let what = || format!("cannot write {}", path.display());
    let mut f = std::fs::File::create(path).map_err(Error::io(what()))?;
    f.write_all(data)
        .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .and_then(|_| f.sync_all())
        .map_err(Error::io(what()))
}

/// Creates the backup's directories (with their modes) and the links of
/// its tablespaces, and `pg_wal`.
pub(super) fn make_dirs(plan: &Plan) -> Result<()> {
    let (m, root) = (&plan.chain[0], &plan.pg_data);
    let io = |what: String| Error::io(what);
    for d in &m.dirs {
        let path = root.join(&d.path);
        if let Some((oid, dest)) = tablespace_link(&d.path, &plan.tablespaces) {
            if std::fs::read_link(&path).is_ok_and(|l| &l == dest) {
                continue;
            }
            if path.is_symlink() || path.is_file() {
                std::fs::remove_file(&path).map_err(io(format!("cannot replace {}", path.display())))?;
            } else if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(format!("cannot replace {}", path.display())))?;
            }
            std::os::unix::fs::symlink(dest, &path).map_err(io(format!("cannot link tablespace {oid} to {}", dest.display())))?;
            continue;
        }
        std::fs::create_dir_all(&path).map_err(io(format!("cannot create {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(d.mode & 0o7777))
            .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    }
    // The WAL directories a backup of an older pgkeep did not record: with
    // pg_wal's mode (0700, or 0750 for a cluster with group access).
    let wal_mode = m.dirs.iter().find(|d| d.path == "pg_wal").map_or(0o700, |d| d.mode & 0o7777);
    for sub in crate::pg::version::wal_dirs(m.pg_version) {
        let path = root.join(sub);
        if !path.is_dir() {
            std::fs::create_dir_all(&path).map_err(io(format!("cannot create {sub}")))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wal_mode))
                .map_err(io(format!("cannot set the mode of {}", path.display())))?;
        }
    }
    Ok(())
}

/// Batches waiting in the channel for a worker: a few per worker (a batch
/// can hold [`BATCH`] files' units, each with its entry).
const BATCHES: usize = 8;

/// Writes the files of a restore: every file but `pg_control` in parallel
/// units, as the chain's lists are read ([`ChainFiles`]), then, once the
/// caller has written what must come before it, `pg_control`.
pub(super) struct Writer<'a> {
    plan: &'a Plan,
    source: Source,
    progress: Arc<Progress>,
    delta: bool,
}

/// A unit, with its file's place in the list and its file's number of
/// units.
type Tagged = (u64, u32, Unit);

/// Units a worker takes at once: one, or up to [`BATCH`] files of one unit
/// each whose pieces are all bundled, their bundles' ranges read once per
/// bundle ([`Span`]).
type Batch = Vec<Tagged>;

/// The most files in a [`Batch`], and the most bytes of bundles its pieces
/// cover.
const BATCH: usize = 256;
const BATCH_BYTES: u64 = 8 << 20;

impl<'a> Writer<'a> {
    pub(super) fn new(plan: &'a Plan, opts: &RestoreOptions) -> Writer<'a> {
        let m = &plan.chain[0];
        let progress = opts.progress.clone().unwrap_or_default();
        progress.plan(m.file_count(), m.size);
        Writer { plan, source: Source::new(&plan.repo), progress, delta: opts.delta }
    }

    /// `jobs` threads restoring the units `next` gives, each with its own
    /// [`Scratch`].
    fn workers(&self, jobs: usize, next: impl Fn() -> Option<Batch> + Send + Sync + 'static) -> Workers<Vec<(u64, u32, bool)>> {
        let (source, progress, root, delta) = (self.source.clone(), self.progress.clone(), self.plan.pg_data.clone(), self.delta);
        Workers::fed("a restore worker", jobs, next, move |scratch: &mut Scratch, batch: &Batch| {
            scratch.spans = match batch.len() {
                1 => Vec::new(),
                _ => spans_of(batch.iter().flat_map(|(_, _, u)| u.pieces.iter().map(|(p, _)| p))),
            };
            let done = batch
                .iter()
                .map(|(seq, units, u)| {
                    restore_unit(u, &root.join(&u.file.path), &source, &progress, delta, scratch).map(|kept| (*seq, *units, kept))
                })
                .collect();
            scratch.spans.clear();
            done
        })
    }

    /// Every file but `pg_control`, `jobs` units at a time; returns how
    /// many files were already as the backup has them (a delta restore
    /// keeps those), and `pg_control` with its layers, for
    /// [`Writer::write_control`].
    pub(super) async fn write_all_but_control(&self, jobs: usize) -> Result<(usize, Option<Layered>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(BATCHES);
        let feeder = tokio::task::spawn_blocking({
            let (repo, chain, root, delta) = (self.plan.repo.clone(), self.plan.chain.clone(), self.plan.pg_data.clone(), self.delta);
            move || feed(&repo, &chain, &root, delta, jobs, tx)
        });
        let rx = std::sync::Mutex::new(rx);
        let mut workers = self.workers(jobs, move || rx.lock().ok()?.recv().ok());
        // A file is unchanged when every unit of it was.
        let (mut unchanged, mut parted) = (0, HashMap::<u64, (u32, bool)>::new());
        let mut failed = None;
        while let Some(done) = workers.next().await {
            let done = match done {
                Ok(d) => d,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            for (seq, units, kept) in done {
                let (seen, all_kept) = match units {
                    1 => (1, kept),
                    _ => {
                        let p = parted.entry(seq).or_insert((0, true));
                        *p = (p.0 + 1, p.1 && kept);
                        *p
                    }
                };
                if seen == units {
                    parted.remove(&seq);
                    unchanged += usize::from(all_kept);
                }
            }
        }
        workers.finish().await?;
        // With the workers gone, the feeder's next send fails: it ends.
        let control = feeder.await.map_err(Error::task("a restore's list reader"))?;
        match failed {
            Some(e) => Err(e),
            None => Ok((unchanged, control?)),
        }
    }

    /// `pg_control`, last, synced.
    pub(super) async fn write_control(&self, control: Option<Layered>) -> Result<()> {
        let Some(control) = control else { return Ok(()) };
        let units: Vec<Batch> = restore_units(&control.file, &control.layer_refs()).into_iter().map(|u| vec![(0, 1, u)]).collect();
        let units = std::sync::Mutex::new(units.into_iter());
        self.workers(1, move || units.lock().ok()?.next()).collect().await?;
        sync_file(&self.plan.pg_data.join(&control.file.path))
    }
}

/// Reads the chain's lists and sends the units of every file but
/// `pg_control` (returned) to the workers, in [`Schedule`] order; creates
/// each file restored in parts at its size first.
fn feed(
    repo: &Repository,
    chain: &[Manifest],
    root: &Path,
    delta: bool,
    jobs: usize,
    tx: std::sync::mpsc::SyncSender<Batch>,
) -> Result<Option<Layered>> {
    let mut files = ChainFiles::open(repo, chain)?;
    let (mut schedule, mut control, mut seq, mut more) = (Schedule::new(jobs), None, 0u64, true);
    let (mut batch, mut batch_bytes) = (Batch::new(), 0u64);
    let send = |b: Batch| tx.send(b).map_err(|_| Error::Input("the restore's workers stopped".into()));
    loop {
        while more && schedule.wants_more() {
            let Some(l) = files.next() else {
                more = false;
                break;
            };
            let l = l?;
            if l.file.path == CONTROL_FILE {
                control = Some(l);
                continue;
            }
            if !l.file.parts.is_empty() {
                prepare_parted(&root.join(&l.file.path), &l.file, delta)?;
            }
            let units = restore_units(&l.file, &l.layer_refs());
            let n = units.len() as u32;
            schedule.add(units.into_iter().map(|u| (seq, n, u)).collect());
            seq += 1;
        }
        let Some(unit) = schedule.take() else {
            if !batch.is_empty() {
                send(batch)?;
            }
            return Ok(control);
        };
        match bundled_bytes(&unit) {
            Some(n) => {
                batch.push(unit);
                batch_bytes += n;
                if batch.len() >= BATCH || batch_bytes >= BATCH_BYTES {
                    send(std::mem::take(&mut batch))?;
                    batch_bytes = 0;
                }
            }
            None => {
                if !batch.is_empty() {
                    send(std::mem::take(&mut batch))?;
                    batch_bytes = 0;
                }
                send(vec![unit])?;
            }
        }
    }
}

/// For a file of one unit whose stored pieces are all bundled: the bytes
/// of bundles they cover (it may join a [`Batch`]).
fn bundled_bytes((_, units, u): &Tagged) -> Option<u64> {
    if *units != 1 {
        return None;
    }
    u.pieces.iter().filter(|(p, _)| p.key.is_some()).try_fold(0, |n, (p, _)| p.range.as_ref().map(|r| n + (r.end - r.start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `restore --delta` writes only the pages that differ, whatever the
    /// file holds (the same bytes, a few pages changed, less, more), and
    /// leaves exactly the backup's bytes in the range it was given.
    #[test]
    fn a_delta_restore_writes_only_the_pages_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10 * PAGE as usize + 100).map(|i| (i % 251) as u8).collect();
        let page = PAGE as usize;
        let mut local = Vec::new();
        let write = |on_disk: &[u8], local: &mut Vec<u8>| {
            std::fs::write(&path, on_disk).unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let written = write_differing(&f, 0, &data, local).unwrap();
            f.set_len(data.len() as u64).unwrap();
            assert!(std::fs::read(&path).unwrap() == data);
            written
        };
        assert_eq!(write(&data, &mut local), 0, "the same bytes");
        let mut two = data.clone();
        two[3 * page + 5] ^= 1;
        two[4 * page] ^= 1;
        two[8 * page + 7] ^= 1;
        assert_eq!(write(&two, &mut local), 3 * PAGE, "three pages changed, two of them adjacent");
        let mut last = data.clone();
        *last.last_mut().unwrap() ^= 1;
        assert_eq!(write(&last, &mut local), 100, "the short last page");
        assert_eq!(write(&data[..5 * page], &mut local), (5 * page + 100) as u64, "a shorter file");
        let mut longer = data.clone();
        longer.extend_from_slice(&[7; 8192]);
        assert_eq!(write(&longer, &mut local), 0, "a longer file, cut to size by the caller");
        assert_eq!(write(&[], &mut local), data.len() as u64, "an empty file");
        // Given in pieces that do not start on a page, a changed page is
        // written at most whole (only the differing pieces of it).
        std::fs::write(&path, &two).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut written = 0;
        for (k, chunk) in data.chunks(3000).enumerate() {
            written += write_differing(&f, (k * 3000) as u64, chunk, &mut local).unwrap();
        }
        assert!(std::fs::read(&path).unwrap() == data);
        assert!(written > 0 && written <= 3 * PAGE, "pieces cut anywhere: {written} bytes written");
    }

    /// A batch reads, per bundle, the range that holds two or more of its
    /// pieces, unless that range is too large; a piece alone in its bundle,
    /// or in an object of its own, is read as before.
    #[test]
    fn a_batch_reads_each_bundle_once_for_the_pieces_it_holds() {
        let bundled = |key: &str, range: Range<u64>| Piece {
            start: 0,
            size: 1,
            key: Some(key.into()),
            range: Some(range),
            repo_size: 0,
            checksum: String::new(),
            content: String::new(),
            delta: false,
        };
        let own = Piece { range: None, ..bundled("backup/F/pg_data/base/1/2.zst", 0..0) };
        let far = SPAN_MAX + 10;
        let pieces = [
            bundled("b/1", 100..200),
            bundled("b/1", 0..100),
            bundled("b/1", 300..350),
            bundled("b/2", 0..10),
            bundled("b/3", 0..10),
            bundled("b/3", far - 10..far),
            own,
        ];
        let spans: Vec<(String, Range<u64>)> = spans_of(pieces.iter()).into_iter().map(|s| (s.key, s.range)).collect();
        assert_eq!(spans, vec![("b/1".to_string(), 0..350)]);
    }

    fn piece(start: u64, size: u64, delta: bool) -> (Piece, Compress) {
        let p = Piece { start, size, key: None, range: None, repo_size: 0, checksum: String::new(), content: String::new(), delta };
        (p, Compress::None)
    }

    /// A chain put newest first: a page the incremental gives is written
    /// once (not first with the full's bytes, then with its own), and only
    /// when the file does not hold it already; what no whole piece covers
    /// ends as zeros, as in a restore into an empty directory.
    #[test]
    fn a_delta_restore_of_a_chain_writes_each_page_once_and_zeros_what_no_piece_covers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let page = PAGE as usize;
        let full: Vec<u8> = (0..8 * page).map(|i| (i % 253) as u8).collect();
        let newer = vec![9u8; page];
        // The file as the chain ends: the full's bytes, page 2 as the
        // incremental has it, and page 9 (past the full's end) too.
        let mut end = full.clone();
        end[2 * page..3 * page].copy_from_slice(&newer);
        end.resize(10 * page, 0);
        end[9 * page..].copy_from_slice(&newer);
        let pieces = [piece(0, 8 * page as u64, false), piece(0, 10 * page as u64, true)];
        let rebuild = |on_disk: &[u8]| {
            std::fs::write(&path, on_disk).unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut place = InPlace::new(&f, 0..10 * PAGE, Vec::new());
            place.put(2 * PAGE, &newer, true).unwrap();
            place.put(9 * PAGE, &newer, true).unwrap();
            for (k, chunk) in full.chunks(2 * page).enumerate() {
                place.put((k * 2 * page) as u64, chunk, false).unwrap();
            }
            let limit = f.metadata().unwrap().len();
            place.zero_gaps(&pieces, limit).unwrap();
            f.set_len(10 * PAGE).unwrap();
            assert!(std::fs::read(&path).unwrap() == end);
            place.written
        };
        assert_eq!(rebuild(&end), 0, "the file already holds the chain's end");
        assert_eq!(rebuild(&full), 2 * PAGE, "the full's bytes: page 2 written once, and page 9, past the end");
        let mut junk = end.clone();
        junk[8 * page + 1] = 1;
        junk[6 * page] ^= 1;
        assert_eq!(rebuild(&junk), 2 * PAGE, "junk where the full ends and no delta gives the page, and in page 6");
    }
}
