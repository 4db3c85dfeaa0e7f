//! Step 3 of a restore: write the files, each rebuilt from its chain of
//! backups and checked as it is written, in parallel units.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The entries of `path` that rebuild it in `chain[0]`, oldest (a whole
/// copy) first, with their backup's compression.
pub(super) fn layers<'a>(
    chain: &'a [Manifest],
    by_path: &[HashMap<&str, &'a FileEntry>],
    path: &str,
) -> Result<Vec<(&'a FileEntry, Compress)>> {
    let mut out = Vec::new();
    for (b, files) in chain.iter().zip(by_path) {
        let Some(f) = files.get(path) else {
            return Err(Error::Corrupt(format!(
                "backup {} holds {path} as changes over backup {}, which does not have it; restore another backup",
                chain[0].label, b.label
            )));
        };
        out.push((*f, b.compress));
        if !f.delta {
            out.reverse();
            return Ok(out);
        }
    }
    Err(Error::Corrupt(format!("backup {} holds {path} as changes, but no backup of its chain holds the whole file", chain[0].label)))
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

/// Orders units (tagged with their file's index, files largest first) so
/// that the file with the most units left goes first, but not a file one
/// of the `jobs - 1` units before it belongs to when another file has
/// units left: two workers writing one file contend in the kernel, and the
/// large files still finish together at the end.
pub(super) fn interleave<T>(units: Vec<(usize, T)>, jobs: usize) -> Vec<(usize, T)> {
    use std::collections::{BinaryHeap, VecDeque};
    let mut by_file: Vec<(usize, VecDeque<T>)> = Vec::new();
    for (i, u) in units {
        match by_file.last_mut() {
            Some((last, q)) if *last == i => q.push_back(u),
            _ => by_file.push((i, VecDeque::from([u]))),
        }
    }
    // (units left, earlier file first, position in by_file)
    let mut heap: BinaryHeap<(usize, std::cmp::Reverse<usize>, usize)> =
        by_file.iter().enumerate().map(|(k, (_, q))| (q.len(), std::cmp::Reverse(k), k)).collect();
    let mut recent: VecDeque<usize> = VecDeque::new();
    let mut out = Vec::new();
    while !heap.is_empty() {
        let mut skipped = Vec::new();
        let pick = loop {
            match heap.pop() {
                Some(top) if recent.contains(&top.2) => skipped.push(top),
                Some(top) => break Some(top),
                None => break None,
            }
        };
        let (left, order, k) = match pick {
            Some(p) => p,
            // Only recently used files have units left: take the first.
            None => skipped.remove(0),
        };
        heap.extend(skipped);
        let (i, q) = &mut by_file[k];
        out.extend(q.pop_front().map(|u| (*i, u)));
        if left > 1 {
            heap.push((left - 1, order, k));
        }
        recent.push_back(k);
        if recent.len() >= jobs.max(1) {
            recent.pop_front();
        }
    }
    out
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
}

/// What a restore or verify worker keeps from one piece to the next: its
/// read buffer and decompression context.
pub(crate) struct Scratch {
    buf: Vec<u8>,
    contexts: crate::codec::Contexts,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { buf: vec![0u8; 1 << 20], contexts: Default::default() }
    }
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
    mut out: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let Some(key) = &piece.key else { return Ok(()) };
    let object = format!("stored object '{key}' in repo {}", source.repo_no);
    let corrupt = |e: std::io::Error| {
        if e.get_ref().is_some_and(|i| i.is::<object_store::Error>()) {
            Error::Io { what: format!("cannot read {object}"), cause: e }
        } else {
            Error::Corrupt(format!("{object} cannot be decompressed ({e}): it is corrupt or truncated; restore another backup"))
        }
    };
    let reader = ObjectReader::open(source.store.clone(), key, piece.range.clone(), source.rt.clone())
        .map_err(Error::storage(format!("cannot read {object}")))?;
    let Scratch { buf, contexts } = scratch;
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
    let out = if parted { std::fs::OpenOptions::new().write(true).open(dest) } else { std::fs::File::create(dest) }
        .map_err(Error::io(format!("cannot create {}", dest.display())))?;
    let write_err = || Error::io(format!("cannot write {}", dest.display()));
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
    let paths: Vec<PathBuf> = plan.files[0].iter().filter(|f| f.path != CONTROL_FILE).map(|f| root.join(&f.path)).collect();
    Workers::start("a restore worker", jobs, paths, |_: &mut (), p: &PathBuf| match std::fs::File::open(p) {
        Ok(f) => f.sync_all().map_err(Error::io(format!("cannot sync {}", p.display()))),
        Err(e) => Err(Error::io(format!("cannot sync {}", p.display()))(e)),
    })
    .collect()
    .await
    .map(|_| ())
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

/// Writes the files of a restore: every file but `pg_control` in parallel
/// units, then, once the caller has written what must come before it,
/// `pg_control`.
pub(super) struct Writer<'a> {
    plan: &'a Plan,
    by_path: Vec<HashMap<&'a str, &'a FileEntry>>,
    source: Source,
    progress: Arc<Progress>,
    delta: bool,
}

impl<'a> Writer<'a> {
    pub(super) fn new(plan: &'a Plan, opts: &RestoreOptions) -> Writer<'a> {
        let m = &plan.chain[0];
        let progress = opts.progress.clone().unwrap_or_default();
        progress.plan(plan.files[0].iter().map(|f| f.parts.len().max(1) as u64).sum(), m.size);
        Writer {
            plan,
            by_path: plan.files.iter().map(|files| files.iter().map(|f| (f.path.as_str(), f)).collect()).collect(),
            source: Source::new(&plan.repo),
            progress,
            delta: opts.delta,
        }
    }

    /// `jobs` threads restoring `units`, each with its own [`Scratch`].
    fn workers(&self, units: Vec<(usize, Unit)>, jobs: usize) -> Workers<(usize, bool)> {
        let (source, progress, root, delta) = (self.source.clone(), self.progress.clone(), self.plan.pg_data.clone(), self.delta);
        Workers::start("a restore worker", jobs, units, move |scratch: &mut Scratch, (i, u): &(usize, Unit)| {
            restore_unit(u, &root.join(&u.file.path), &source, &progress, delta, scratch).map(|kept| (*i, kept))
        })
    }

    /// Every file but `pg_control`, `jobs` units at a time, largest files
    /// first; returns how many files were already as the backup has them
    /// (a delta restore keeps those).
    pub(super) async fn write_all_but_control(&self, jobs: usize) -> Result<usize> {
        let mut rest: Vec<&FileEntry> = self.plan.files[0].iter().filter(|f| f.path != CONTROL_FILE).collect();
        // Largest first, so that the workers finish together.
        rest.sort_by_key(|f| std::cmp::Reverse(f.size));
        let mut units = Vec::new();
        for (i, f) in rest.iter().enumerate() {
            let layers = layers(&self.plan.chain, &self.by_path, &f.path)?;
            if !f.parts.is_empty() {
                prepare_parted(&self.plan.pg_data.join(&f.path), f, self.delta)?;
            }
            units.extend(restore_units(f, &layers).into_iter().map(|u| (i, u)));
        }
        let done = self.workers(interleave(units, jobs), jobs).collect().await?;
        // A file is unchanged when every unit of it was.
        let mut changed = vec![false; rest.len()];
        let mut seen = vec![false; rest.len()];
        for (i, kept) in done {
            seen[i] = true;
            changed[i] |= !kept;
        }
        Ok(seen.iter().zip(&changed).filter(|(s, c)| **s && !**c).count())
    }

    /// `pg_control`, last, synced.
    pub(super) async fn write_control(&self) -> Result<()> {
        for f in self.plan.files[0].iter().filter(|f| f.path == CONTROL_FILE) {
            let units = restore_units(f, &layers(&self.plan.chain, &self.by_path, &f.path)?).into_iter().map(|u| (0, u)).collect();
            self.workers(units, 1).collect().await?;
            sync_file(&self.plan.pg_data.join(&f.path))?;
        }
        Ok(())
    }
}
