//! The copy of a backup's files, streamed: a walk of the data directory
//! ([`Walk`]), read along the prior's file list ([`Prior`]), feeds the
//! copy workers through a bounded channel, and each file's entry is
//! written to the new backup's file list as soon as it and every file
//! before it in [`path_order`](crate::repo::filelist::path_order) are stored. What is held in memory is the
//! walk's open directories, the units in the channel, and the entries of
//! at most [`WINDOW`] files between the first not yet stored and the last
//! fed: not the backup's list of files.
//!
//! `global/pg_control` is fed last, once every other file is stored: a
//! standby backup ends at the minimum recovery point recorded there,
//! which must cover every page read (see docs/standby.md).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use crate::codec::Compress;
use crate::crypto::{Cipher, Sealing};
use crate::error::{Error, Result};
use crate::pg::checksum::{FileCheck, MAX_LISTED};
use crate::progress::Progress;
use crate::repo::filelist::{FileList, ListWriter};
use crate::repo::manifest::{Part, PART_SIZE};
use crate::repo::{pages, DirEntry, FileEntry, Manifest, Repository};
use crate::storage::ObjectWriter;
use crate::types::{BackupLabel, Lsn};
use crate::workers::Workers;

use super::basis::Basis;
use super::bundle;
use super::plan::{self, Planned, PlannedFile, Planner, Walk};
use super::resume::{Checkpointer, Reuse};

/// Files fed to the workers beyond the first one not yet stored, at most:
/// a bound on the entries waiting for their turn in the list, while the
/// parts of a big file are copied.
const WINDOW: u64 = 4096;
/// Units waiting in the channel for a worker.
const CHANNEL: usize = 64;
/// Consecutive entries taken as they are (unread or resumed) sent as one
/// unit, at most: one hand-over between threads for many entries, not one
/// each (an incremental of a million unchanged files spent a quarter of
/// its time handing them over). Below [`WINDOW`].
const KEPT_RUN: usize = 256;

/// What a backup's copy is given.
pub(super) struct Copy {
    pub repo: Repository,
    pub sink: Sink,
    pub pg_data: PathBuf,
    /// The backup built on, for an incremental or a differential.
    pub prior: Option<Manifest>,
    /// The entries taken over from an interrupted attempt.
    pub reuse: Option<Reuse>,
    /// When the backup began.
    pub began: chrono::DateTime<chrono::Utc>,
    pub jobs: usize,
    /// The backup's start, when pages are checked against their checksums.
    pub verify: Option<Lsn>,
    pub checkpointer: Arc<Checkpointer>,
    pub progress: Arc<Progress>,
}

/// What the copy stored.
pub(super) struct Copied {
    /// The directories walked, parents first.
    pub dirs: Vec<DirEntry>,
    /// The backup's file list, written.
    pub list: FileList,
    /// Bytes read, and stored.
    pub size: u64,
    pub repo_size: u64,
    /// The entries of files with pages failing their checksum.
    pub checksum_failures: Vec<FileEntry>,
    /// Files (and their bytes) taken over from an interrupted attempt.
    pub kept: (usize, u64),
    /// Files (and their bytes) left unread: unchanged since the prior.
    pub unread: (usize, u64),
}

/// A unit of copying: a file, or a part of it (`units` in all), at its
/// place `seq` in the list; or an entry taken over as it is.
enum Unit {
    Copy {
        seq: u64,
        file: Arc<PlannedFile>,
        units: u32,
        part: Option<Range<u64>>,
    },
    /// Entries taken as they are, at places `first`, `first + 1`, ...;
    /// each with whether it was resumed (else unread).
    Kept {
        first: u64,
        entries: Vec<(FileEntry, bool)>,
    },
}

/// What a unit gave.
enum Piece {
    Copied { seq: u64, file: Arc<PlannedFile>, units: u32, stored: Option<Stored> },
    Kept { first: u64, entries: Vec<(FileEntry, bool)> },
}

/// How far the list is written, for the feeder to wait on.
#[derive(Default)]
struct Window {
    state: Mutex<(u64, bool)>,
    moved: Condvar,
}

impl Window {
    /// Waits until file `seq` may be fed: within [`WINDOW`] of the first
    /// file not yet written to the list, or, with `last`, once every file
    /// before it is. `false` once the copy is stopping.
    fn wait(&self, seq: u64, last: bool) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        loop {
            let (written, stopping) = *state;
            if stopping {
                return false;
            }
            if seq < written + WINDOW && (!last || written == seq) {
                return true;
            }
            state = match self.moved.wait(state) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
    }

    /// Whether [`Window::wait`] would return at once.
    fn open(&self, seq: u64, last: bool) -> bool {
        self.state.lock().is_ok_and(|s| s.1 || (seq < s.0 + WINDOW && (!last || s.0 == seq)))
    }

    fn written(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = n;
        }
        self.moved.notify_all();
    }

    fn stop(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
        self.moved.notify_all();
    }
}

/// Copies the files (call from a blocking thread of the runtime).
pub(super) fn run(c: Copy) -> Result<Copied> {
    let Copy { repo, sink, pg_data, prior, reuse, began, jobs, verify, checkpointer, progress } = c;
    let rt = tokio::runtime::Handle::current();
    rt.spawn_blocking({
        let (pg_data, progress) = (pg_data.clone(), progress.clone());
        move || count(&pg_data, &progress)
    });
    let window = Arc::new(Window::default());
    let (tx, rx) = sync_channel::<Unit>(CHANNEL);
    let feeder = rt.spawn_blocking({
        let (repo, window) = (repo.clone(), window.clone());
        move || {
            let fed = feed(&repo, &pg_data, prior, began, reuse, &tx, &window);
            drop(tx);
            fed
        }
    });
    let rx = Mutex::new(rx);
    let mut workers = {
        let (sink, progress) = (sink.clone(), progress.clone());
        Workers::fed(
            "a backup worker",
            jobs,
            move || rx.lock().ok()?.recv().ok(),
            move |scratch: &mut Scratch, unit: &Unit| work(unit, &sink, verify, &progress, scratch),
        )
    };
    let collected = collect(&mut workers, &repo, &sink, &checkpointer, &window);
    if collected.is_err() {
        window.stop();
        workers.stop();
    }
    let finished = workers.finish_blocking();
    let fed = rt.block_on(feeder).map_err(Error::task("a backup's walk"));
    let (mut copied, count) = collected?;
    finished?;
    let (dirs, fed) = fed??;
    if fed != count {
        return Err(Error::Input(format!("the backup fed {fed} files and listed {count}; this is a bug in pgkeep, please report it")));
    }
    sink.bundler.finish().map_err(|e| Error::Io { what: format!("cannot store a bundle in repo {}", sink.repo_no), cause: e })?;
    copied.dirs = dirs;
    Ok(copied)
}

/// Counts the files and bytes to copy for the progress totals, beside the
/// copy (which does not wait for it).
fn count(pg_data: &std::path::Path, progress: &Progress) {
    let (mut units, mut bytes) = (0u64, 0u64);
    let Ok(walk) = Walk::new(pg_data) else { return };
    for f in walk {
        let Ok(f) = f else { return };
        units += f.size.div_ceil(PART_SIZE).max(1);
        bytes += f.size;
    }
    progress.plan(units, bytes);
}

/// Walks the data directory and feeds every file to the workers in
/// [`path_order`](crate::repo::filelist::path_order), with its basis from the prior; returns the directories
/// walked and the number of files fed.
fn feed(
    repo: &Repository,
    pg_data: &std::path::Path,
    prior: Option<Manifest>,
    began: chrono::DateTime<chrono::Utc>,
    mut reuse: Option<Reuse>,
    tx: &SyncSender<Unit>,
    window: &Window,
) -> Result<(Vec<DirEntry>, u64)> {
    let prior = match prior {
        Some(m) => Some((m.clone(), repo.file_reader(&m)?)),
        None => None,
    };
    let mut planner = Planner::new(pg_data, prior, began)?;
    let stopped = || Error::Input("the backup's copy stopped".into());
    let mut seq = 0u64;
    // Kept entries not sent yet, the last at `seq - 1`; sent before the
    // feeder could wait for the list to move past them.
    let mut run: Vec<(FileEntry, bool)> = Vec::new();
    let send_run = |run: &mut Vec<(FileEntry, bool)>, seq: u64| {
        run.is_empty() || tx.send(Unit::Kept { first: seq - run.len() as u64, entries: std::mem::take(run) }).is_ok()
    };
    for planned in planner.by_ref() {
        let Planned { file: f, unread } = planned?;
        let last = f.path == crate::pg::CONTROL_FILE;
        if !run.is_empty() && (run.len() >= KEPT_RUN || !window.open(seq, last)) && !send_run(&mut run, seq) {
            return Err(stopped());
        }
        if !window.wait(seq, last) {
            return Err(stopped());
        }
        let kept = match unread {
            Some(entry) => Some((entry, false)),
            None => reuse.as_mut().and_then(|r| r.take(&f)).map(|entry| (entry, true)),
        };
        let sent = match kept {
            Some(kept) => {
                run.push(kept);
                true
            }
            None => {
                let sent = send_run(&mut run, seq);
                let file = Arc::new(f);
                let units = file.size.div_ceil(PART_SIZE).max(1);
                sent && (0..units).all(|k| {
                    let part = (file.size > PART_SIZE).then(|| k * PART_SIZE..(k + 1) * PART_SIZE);
                    tx.send(Unit::Copy { seq, file: file.clone(), units: units as u32, part }).is_ok()
                })
            }
        };
        if !sent {
            return Err(stopped());
        }
        seq += 1;
    }
    if !send_run(&mut run, seq) {
        return Err(stopped());
    }
    Ok((planner.into_dirs(), seq))
}

/// Copies one unit.
fn work(unit: &Unit, sink: &Sink, verify: Option<Lsn>, progress: &Progress, scratch: &mut Scratch) -> Result<Piece> {
    let (seq, file, units, part) = match unit {
        Unit::Kept { first, entries } => {
            for (entry, _) in entries {
                progress.add_bytes(entry.size);
                // As many as the units the count planned for it.
                for _ in 0..entry.size.div_ceil(PART_SIZE).max(1) {
                    progress.file_done();
                }
            }
            return Ok(Piece::Kept { first: *first, entries: entries.clone() });
        }
        Unit::Copy { seq, file, units, part } => (*seq, file, *units, part),
    };
    let name = match part {
        Some(r) => format!("{}.part{}", file.path, r.start / PART_SIZE),
        None => file.path.clone(),
    };
    let key = crate::repo::keys::file(&sink.label, &name, sink.compress.extension());
    let check = verify.and_then(|start| Some(FileCheck::new(plan::relation_segment(&file.path)?, start)));
    let stored = copy_one(file, part.clone(), sink, key, progress, check, scratch)?;
    Ok(Piece::Copied { seq, file: file.clone(), units, stored })
}

/// Reads what the workers stored and writes each file's entry to the list
/// in order; returns the totals and the number of files listed.
fn collect(
    workers: &mut Workers<Piece>,
    repo: &Repository,
    sink: &Sink,
    checkpointer: &Checkpointer,
    window: &Window,
) -> Result<(Copied, u64)> {
    let mut list = ListWriter::create(repo, &sink.label, sink.compress)?;
    let mut copied = Copied {
        dirs: Vec::new(),
        list: FileList::default(),
        size: 0,
        repo_size: 0,
        checksum_failures: Vec::new(),
        kept: (0, 0),
        unread: (0, 0),
    };
    let mut pieces: HashMap<u64, Vec<Option<Stored>>> = HashMap::new();
    let mut ready: BTreeMap<u64, Option<FileEntry>> = BTreeMap::new();
    let mut next = 0u64;
    while let Some(piece) = workers.next_blocking() {
        match piece? {
            Piece::Kept { first, entries } => {
                for (seq, (entry, resumed)) in (first..).zip(entries) {
                    let count = if resumed { &mut copied.kept } else { &mut copied.unread };
                    count.0 += 1;
                    count.1 += entry.size;
                    ready.insert(seq, Some(entry));
                }
            }
            Piece::Copied { seq, file, units, stored } => {
                let got = pieces.entry(seq).or_default();
                got.push(stored);
                if got.len() == units as usize {
                    let got = pieces.remove(&seq).unwrap_or_default();
                    let entry = assemble(&file, got);
                    if let Some(e) = &entry {
                        checkpointer.record(e);
                    }
                    ready.insert(seq, entry);
                }
            }
        }
        let before = next;
        while let Some(entry) = ready.remove(&next) {
            if let Some(e) = entry {
                list.push(&e)?;
                copied.size += e.size;
                copied.repo_size += e.repo_size;
                if e.checksum_error_pages() > 0 {
                    copied.checksum_failures.push(e);
                }
            }
            next += 1;
        }
        if next != before {
            window.written(next);
        }
    }
    if !pieces.is_empty() || !ready.is_empty() {
        return Err(Error::Input("a backup's copy ended with files not listed; this is a bug in pgkeep, please report it".into()));
    }
    copied.list = list.finish()?;
    Ok((copied, next))
}

/// What a copy worker keeps from one unit to the next.
struct Scratch {
    buf: Vec<u8>,
    record: Vec<u8>,
    contexts: crate::codec::Contexts,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { buf: vec![0u8; 1 << 20], record: Vec::with_capacity(pages::PAGE_SIZE + 8), contexts: Default::default() }
    }
}

/// What one unit stored: a whole file, or one part of it.
struct Stored {
    start: u64,
    size: u64,
    key: Option<String>,
    repo_size: u64,
    offset: Option<u64>,
    checksum: String,
    pages: u64,
    content: Option<String>,
    checksum_errors: Vec<u32>,
    checksum_errors_unlisted: u64,
}

/// The manifest entry of a file from what its units stored; `None` when
/// the file was removed before all of it could be read (the WAL replay
/// handles that).
fn assemble(f: &PlannedFile, pieces: Vec<Option<Stored>>) -> Option<FileEntry> {
    let mut pieces: Vec<Stored> = pieces.into_iter().collect::<Option<_>>()?;
    pieces.sort_by_key(|p| p.start);
    let mut errors: Vec<u32> = pieces.iter().flat_map(|p| p.checksum_errors.iter().copied()).collect();
    let unlisted = pieces.iter().map(|p| p.checksum_errors_unlisted).sum::<u64>() + errors.len().saturating_sub(MAX_LISTED) as u64;
    errors.truncate(MAX_LISTED);
    let entry = FileEntry {
        path: f.path.clone(),
        size: pieces.iter().map(|p| p.start + p.size).max().unwrap_or(0),
        mode: f.mode,
        mtime: f.mtime,
        ctime: f.ctime,
        checksum: String::new(),
        key: None,
        repo_size: pieces.iter().map(|p| p.repo_size).sum(),
        delta: f.delta(),
        pages: pieces.iter().map(|p| p.pages).sum(),
        offset: None,
        content: None,
        checksum_errors: errors,
        checksum_errors_unlisted: unlisted,
        parts: Vec::new(),
        id: f.id,
    };
    if f.size <= PART_SIZE {
        let p = pieces.pop()?;
        return Some(FileEntry { size: p.size, checksum: p.checksum, key: p.key, offset: p.offset, content: p.content, ..entry });
    }
    let parts = pieces
        .into_iter()
        .map(|p| Part {
            start: p.start,
            size: p.size,
            key: p.key,
            repo_size: p.repo_size,
            checksum: p.checksum,
            pages: p.pages,
            content: p.content,
        })
        .collect();
    Some(FileEntry { parts, ..entry })
}

/// Copies one file, or the `part` of it: read, checksum, compress, upload;
/// whole, or as its [`basis`] says; with `check`, every
/// page read is also verified against its page checksum (in a delta too,
/// stored or not). `None` when the file was removed before it could be
/// opened.
/// `global/pg_control` read whole, and again while its CRC fails: the
/// server rewrites it in place, and a read during that write can see part
/// of each version (PostgreSQL's own reader retries the same way, ten
/// times: `src/common/controldata_utils.c`, `get_controlfile_by_exact_path`,
/// "due to a concurrent write").
fn read_control(path: &std::path::Path) -> Result<Vec<u8>> {
    for _ in 0..10 {
        let bytes = std::fs::read(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
        if crate::pg::version::SUPPORTED.iter().any(|m| crate::pg::version::control_is_valid(&bytes, m)) {
            return Ok(bytes);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(Error::Corrupt(format!(
        "{} fails its CRC in 10 reads, or is not the control file of a PostgreSQL pgkeep supports; check the data directory with pg_controldata",
        path.display()
    )))
}

fn copy_one(
    f: &PlannedFile,
    part: Option<Range<u64>>,
    sink: &Sink,
    key: String,
    progress: &Progress,
    mut check: Option<FileCheck>,
    scratch: &mut Scratch,
) -> Result<Option<Stored>> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::FileExt;
    let mut src = match std::fs::File::open(&f.source) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", f.source.display()))(e)),
    };
    let read_err = || Error::io(format!("cannot read {}", f.source.display()));
    let start = part.as_ref().map_or(0, |r| r.start);
    if start > 0 {
        src.seek(std::io::SeekFrom::Start(start)).map_err(read_err())?;
    }
    let control;
    let mut reader: Box<dyn Read + '_> = if f.path == crate::pg::CONTROL_FILE && part.is_none() {
        control = read_control(&f.source)?;
        Box::new(&control[..])
    } else {
        Box::new((&src).take(part.as_ref().map_or(u64::MAX, |r| r.end - r.start)))
    };
    let upload_err = |e: std::io::Error| Error::Io { what: format!("cannot store '{key}' in repo {}", sink.repo_no), cause: e };
    let out = if part.is_none() && f.size < bundle::SMALL_FILE {
        Out::Memory(Vec::new())
    } else {
        Out::Object(Box::new(ObjectWriter::new(sink.store.clone(), &key, sink.rt.clone())))
    };
    let writer = Sealing::new(sink.cipher.as_ref(), out)?;
    let Scratch { buf, record, contexts } = scratch;
    let mut enc = sink.compress.encoder_in(writer, sink.level, contexts).map_err(upload_err)?;
    let mut hasher = blake3::Hasher::new();
    // For a delta, also the hash of the bytes as read: what a full backup
    // would have stored, which `restore --delta` compares against.
    let mut content = f.delta().then(blake3::Hasher::new);
    let (mut size, mut changed) = (0u64, 0u64);
    loop {
        let n = fill(&mut reader, buf).map_err(read_err())?;
        if n == 0 {
            break;
        }
        let first = (start + size) / pages::PAGE_SIZE as u64;
        if let Some(c) = check.as_mut() {
            let reread = |page: u64, out: &mut [u8]| match src.read_exact_at(out, page * pages::PAGE_SIZE as u64) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                Err(e) => Err(e),
            };
            c.check(first, &buf[..n], reread).map_err(read_err())?;
        }
        match f.basis {
            Basis::Whole => {
                hasher.update(&buf[..n]);
                enc.write_all(&buf[..n]).map_err(upload_err)?;
            }
            Basis::Unchanged => {
                if let Some(c) = content.as_mut() {
                    c.update(&buf[..n]);
                }
            }
            Basis::Pages { since } => {
                if let Some(c) = content.as_mut() {
                    c.update(&buf[..n]);
                }
                for (i, page) in buf[..n].chunks(pages::PAGE_SIZE).enumerate() {
                    if pages::page_changed(page, since) {
                        record.clear();
                        pages::write_record(record, (first + i as u64) as u32, page).expect("writes to a Vec");
                        hasher.update(record);
                        enc.write_all(record).map_err(upload_err)?;
                        changed += 1;
                    }
                }
            }
        }
        size += n as u64;
        progress.add_bytes(n as u64);
    }
    progress.file_done();
    let (checksum_errors, checksum_errors_unlisted) = check.map(FileCheck::finish).unwrap_or_default();
    // A delta of no pages stores nothing: dropping the writer unfinished
    // leaves no object behind.
    let (key, repo_size, offset) = if f.delta() && changed == 0 {
        (None, 0, None)
    } else {
        match enc.finish().and_then(Sealing::finish).map_err(upload_err)? {
            Out::Object(w) => {
                let repo_size = w.finish().map_err(upload_err)?;
                (Some(key), repo_size, None)
            }
            Out::Memory(bytes) => {
                let (bundle, offset) = sink.bundler.append(&bytes).map_err(upload_err)?;
                (Some(bundle), bytes.len() as u64, Some(offset))
            }
        }
    };
    Ok(Some(Stored {
        start,
        size,
        key,
        repo_size,
        offset,
        checksum: hasher.finalize().to_hex().to_string(),
        pages: changed,
        content: content.map(|c| c.finalize().to_hex().to_string()),
        checksum_errors,
        checksum_errors_unlisted,
    }))
}

/// Where one file's stored form goes: its own object, or memory, to be
/// appended to a bundle.
enum Out {
    Object(Box<ObjectWriter>),
    Memory(Vec<u8>),
}

impl std::io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::Object(w) => w.write(buf),
            Out::Memory(v) => v.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where and how a backup's files are stored.
#[derive(Clone)]
pub(super) struct Sink {
    label: BackupLabel,
    bundler: Arc<bundle::Bundler>,
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Handle,
    compress: Compress,
    level: Option<i32>,
    cipher: Option<Cipher>,
    repo_no: usize,
}

impl Sink {
    pub(super) fn new(repo: &Repository, label: &BackupLabel, compress: Compress, level: Option<i32>) -> Sink {
        let rt = tokio::runtime::Handle::current();
        Sink {
            bundler: Arc::new(bundle::Bundler::new(repo.store().object_store(), crate::repo::keys::bundles(label), rt.clone())),
            label: label.clone(),
            store: repo.store().object_store(),
            rt,
            compress,
            level,
            cipher: repo.cipher.clone(),
            repo_no: repo.number,
        }
    }
}

/// Reads until `buf` is full or the file ends, so that every chunk but the
/// last holds whole pages; returns the bytes read.
fn fill(src: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup never stores a control file that fails its CRC (a read
    /// torn by the server's rewrite, a damaged file): it reads again, then
    /// fails in one line.
    #[test]
    fn a_control_file_failing_its_crc_is_not_backed_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg_control");
        let good = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/pg/testdata/pg_control.18")).unwrap();
        std::fs::write(&path, &good).unwrap();
        assert_eq!(read_control(&path).unwrap(), good);
        let mut torn = good.clone();
        torn[100] ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        let e = read_control(&path).unwrap_err().to_string();
        assert!(e.contains("fails its CRC in 10 reads") && !e.contains('\n'), "{e}");
    }

    async fn copy_of(repo: &Repository, data: &std::path::Path, label: &str, prior: Option<Manifest>) -> Result<Copied> {
        copy_began(repo, data, label, prior, chrono::Utc::now()).await
    }

    async fn copy_began(
        repo: &Repository,
        data: &std::path::Path,
        label: &str,
        prior: Option<Manifest>,
        began: chrono::DateTime<chrono::Utc>,
    ) -> Result<Copied> {
        let label = BackupLabel(label.into());
        let first = super::super::resume::Checkpoint::new(
            label.clone(),
            crate::repo::BackupType::Full,
            None,
            Compress::Zstd,
            chrono::Utc::now(),
            Vec::new(),
        );
        let checkpointer = Checkpointer::start(repo, first).await?;
        let copy = Copy {
            repo: repo.clone(),
            sink: Sink::new(repo, &label, Compress::Zstd, None),
            pg_data: data.to_path_buf(),
            prior,
            reuse: None,
            began,
            jobs: 2,
            verify: None,
            checkpointer,
            progress: Default::default(),
        };
        tokio::task::spawn_blocking(move || run(copy)).await.unwrap()
    }

    fn listed(repo: &Repository, list: &FileList) -> Vec<FileEntry> {
        let what = "backup under test";
        tokio::task::block_in_place(|| {
            crate::repo::filelist::ListReader::open(repo, list, Compress::Zstd, what).unwrap().collect::<Result<_>>().unwrap()
        })
    }

    /// More files than the window, one stored as an object of its own:
    /// every file listed once, in the list's order with the control file
    /// last, with the checksum of what it holds; an incremental on it
    /// reads the prior's list along its walk; a store that fails ends the
    /// copy with the error, not a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_copy_lists_every_file_once_in_order() {
        let data = tempfile::tempdir().unwrap();
        let content = |i: usize| format!("{i}").repeat(i % 50 + 1).into_bytes();
        let mut files: Vec<(String, Vec<u8>)> = (0..(WINDOW as usize + 1500)).map(|i| (format!("base/1/{i}"), content(i))).collect();
        files.push(("base/1/99999".into(), vec![7u8; 300 << 10]));
        files.push(("pg_xact/0000".into(), b"xact".to_vec()));
        let control = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/pg/testdata/pg_control.18")).unwrap();
        files.push((crate::pg::CONTROL_FILE.into(), control));
        for (p, bytes) in &files {
            super::super::plan::tests::data_dir(data.path(), &[(p.as_str(), bytes.as_slice())]);
        }
        files.sort_by(|a, b| crate::repo::filelist::path_order(&a.0, &b.0));

        let faulty = crate::storage::testing::Faulty::new(std::sync::Arc::new(object_store::memory::InMemory::new()));
        let store = crate::storage::Store::from_object_store(faulty.clone(), "memory://");
        let (repo, _) = Repository::create(&store, crate::repo::StanzaMeta::for_test(7), 1, None).await.unwrap();
        let full = copy_of(&repo, data.path(), "20261202-000000F", None).await.unwrap();
        let entries = listed(&repo, &full.list);
        assert_eq!(entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>());
        assert_eq!(entries.last().unwrap().path, crate::pg::CONTROL_FILE);
        for (e, (_, bytes)) in entries.iter().zip(&files) {
            assert_eq!(
                (e.size, e.checksum.as_str(), e.delta),
                (bytes.len() as u64, blake3::hash(bytes).to_hex().as_str(), false),
                "{}",
                e.path
            );
        }
        assert!(entries.iter().find(|e| e.path == "base/1/99999").unwrap().offset.is_none(), "a big file is an object of its own");
        assert_eq!(full.size, files.iter().map(|f| f.1.len() as u64).sum::<u64>());

        // An incremental without page checksums: relation files unchanged
        // in size and mtime since before the prior began are not read
        // again; one rewritten with another size is.
        std::fs::write(data.path().join("base/1/5"), b"rewritten").unwrap();
        let stop = chrono::Utc::now() + chrono::Duration::hours(1);
        let prior = Manifest {
            file_list: Some(full.list.clone()),
            compress: Compress::Zstd,
            page_checksums: false,
            ..Manifest::for_test("20261202-000000F", crate::repo::BackupType::Full, None, stop, 0x500_0000, (1, 2))
        };
        // This backup began before the prior (the clock was set back):
        // every file is read.
        let incr = copy_of(&repo, data.path(), "20261202-000000F_20261202-000001I", Some(prior.clone())).await.unwrap();
        let entries = listed(&repo, &incr.list);
        assert_eq!(entries.len(), files.len());
        let delta: Vec<&str> = entries.iter().filter(|e| !e.delta).map(|e| e.path.as_str()).collect();
        assert_eq!(delta, ["base/1/5", "pg_xact/0000", "global/pg_control"], "copied whole");
        assert_eq!(incr.unread.0, 0);

        // Begun after the prior: every file unchanged since is listed
        // unread, with the content the full read; the rewritten one and
        // the control file are read.
        let began = stop + chrono::Duration::minutes(1);
        let incr = copy_began(&repo, data.path(), "20261202-000000F_20261202-000002I", Some(prior), began).await.unwrap();
        let entries = listed(&repo, &incr.list);
        let read: Vec<&str> = entries.iter().filter(|e| !e.delta || e.key.is_some()).map(|e| e.path.as_str()).collect();
        assert_eq!(read, ["base/1/5", "global/pg_control"]);
        assert_eq!(incr.unread.0, files.len() - 2);
        for (e, (_, bytes)) in entries.iter().zip(&files).filter(|(e, _)| e.key.is_none()) {
            assert_eq!(e.content.as_deref(), Some(blake3::hash(bytes).to_hex().as_str()), "{}", e.path);
            assert!(e.ctime.is_some() && e.pages == 0, "{e:?}");
        }

        // A worker's object, a bundle (at the end), the list: each fails
        // the copy.
        for (n, key) in ["99999", "/bundle/", "files.jsonl"].into_iter().enumerate() {
            use crate::storage::testing::{Fault, Op, Rule};
            faulty.set(vec![Rule::new(Op::Put, key, Fault::Fail)]);
            let e =
                copy_of(&repo, data.path(), &format!("20261202-00001{n}F"), None).await.err().expect("a store that fails fails the copy");
            assert!(e.to_string().contains(key.trim_matches('/')), "{key}: {e}");
        }
    }
}
