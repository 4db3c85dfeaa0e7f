//! What a backup copies: a walk of the data directory and its tablespaces,
//! with the rules of PostgreSQL's own base backup about what to leave out
//! (see "Backing Up the Data Directory" in the PostgreSQL documentation and
//! `basebackup.c`).

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::repo::manifest::FileIdentity;
use crate::repo::{DirEntry, FileEntry, Manifest};

use chrono::{DateTime, Utc};

use super::basis::{file_basis, unread_entry, Basis};

/// Directories whose contents are never copied (the directory itself is).
const SKIP_CONTENTS: &[&str] =
    &["pg_wal", "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots", "pg_stat_tmp", "pg_subtrans"];

/// Files never copied, at the top of the data directory.
const SKIP_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "backup_manifest",
    "current_logfiles",
    "current_logfiles.tmp",
    "postgresql.auto.conf.tmp",
    "recovery.signal",
    "standby.signal",
];

/// A file to copy.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedFile {
    /// Path relative to the data directory.
    pub path: String,
    /// Where to read it.
    pub source: PathBuf,
    /// Size when planned (the copy records what it actually read).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Status-change time, nanoseconds since the epoch.
    pub ctime: Option<i64>,
    /// How much of it to copy (see [`basis`](super::basis)).
    pub basis: Basis,
    /// Which file it is, to tell a re-created file from the one a prior
    /// backup read under the same path.
    pub id: Option<FileIdentity>,
}

impl PlannedFile {
    /// Whether it is stored as a delta over the prior backup's copy.
    pub fn delta(&self) -> bool {
        self.basis != Basis::Whole
    }

    /// Whether `before` (an earlier backup's entry of its path) was read
    /// from this same file: both record an identity, and it is the same.
    pub fn same_file_as(&self, before: &FileEntry) -> bool {
        matches!((&self.id, &before.id), (Some(now), Some(then)) if now.same_file(then))
    }

    /// Whether its ctime is the one `before` recorded, where both record
    /// one: every write moves it, and nothing sets it back.
    pub fn ctime_unmoved(&self, before: &FileEntry) -> bool {
        match (self.ctime, before.ctime) {
            (Some(now), Some(then)) => now == then,
            _ => true,
        }
    }
}

/// Decides whether a path (relative to the data directory) is copied.
/// `is_dir` tells directories from files. Pure; unit-tested below.
pub fn excluded(rel: &str, is_dir: bool) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.starts_with("pgsql_tmp") {
        return true;
    }
    if !is_dir && (name.starts_with("pg_internal.init") || (!rel.contains('/') && SKIP_TOP_FILES.contains(&name))) {
        return true;
    }
    // The contents of the skipped directories, but not the directories,
    // nor pg_wal's own directories (empty, with their modes), as
    // pg_basebackup sends them: `archive_status`, and from PostgreSQL 17
    // `summaries` (see crate::pg::version).
    SKIP_CONTENTS.iter().any(|d| rel.len() > d.len() && rel.starts_with(d) && rel.as_bytes()[d.len()] == b'/')
        && !(is_dir && crate::pg::version::WAL_SUBDIRS.contains(&rel))
}

/// A walk of the data directory, tablespaces included (each in place,
/// under its link in `pg_tblspc`), that gives the files to copy one at a
/// time in [`path_order`](crate::repo::filelist::path_order): `global/pg_control` last. It holds the sorted
/// names of the directories it is in (one per level), never the whole
/// tree: its memory is that of the largest directory's names. Each
/// directory is read once, when the walk enters it; a directory or file
/// removed before that is left out (WAL replay recreates what matters).
pub struct Walk {
    open: Vec<OpenDir>,
    dirs: Vec<DirEntry>,
    control: Option<PlannedFile>,
    failed: bool,
}

/// A directory the walk is in.
struct OpenDir {
    path: PathBuf,
    rel: String,
    names: Names,
    next: usize,
    /// In a database directory: the relfilenodes with an init fork.
    unlogged: HashSet<String>,
}

/// A directory's names, sorted, in one buffer.
#[derive(Default)]
struct Names {
    text: String,
    spans: Vec<(u32, u32)>,
}

impl Names {
    fn read(dir: &Path) -> std::io::Result<Names> {
        let mut names = Names::default();
        for entry in std::fs::read_dir(dir)? {
            let Ok(entry) = entry else { continue };
            // Names that are not UTF-8 are not PostgreSQL's.
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let start = names.text.len();
            names.text.push_str(&name);
            let (start, len) = (u32::try_from(start), u32::try_from(name.len()));
            let (Ok(start), Ok(len)) = (start, len) else {
                return Err(std::io::Error::other("over 4 GiB of names in one directory"));
            };
            names.spans.push((start, len));
        }
        let text = &names.text;
        names.spans.sort_unstable_by(|a, b| Self::slice(text, *a).cmp(Self::slice(text, *b)));
        Ok(names)
    }

    fn slice(text: &str, (start, len): (u32, u32)) -> &str {
        &text[start as usize..(start + len) as usize]
    }

    fn get(&self, i: usize) -> Option<&str> {
        self.spans.get(i).map(|s| Self::slice(&self.text, *s))
    }
}

impl Walk {
    /// Starts at `pg_data`, which must be readable.
    pub fn new(pg_data: &Path) -> Result<Walk> {
        let mut walk = Walk { open: Vec::new(), dirs: Vec::new(), control: None, failed: false };
        walk.enter(pg_data.to_path_buf(), String::new())?;
        Ok(walk)
    }

    /// The directories walked, parents first.
    pub fn into_dirs(self) -> Vec<DirEntry> {
        self.dirs
    }

    fn enter(&mut self, path: PathBuf, rel: String) -> Result<()> {
        let names = match Names::read(&path) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => return Ok(()),
            Err(e) => return Err(Error::io(format!("cannot read directory {}", path.display()))(e)),
        };
        let unlogged = match is_relation_dir(&rel) {
            true => (0..names.spans.len()).filter_map(|i| names.get(i)?.strip_suffix("_init").map(str::to_owned)).collect(),
            false => HashSet::new(),
        };
        self.open.push(OpenDir { path, rel, names, next: 0, unlogged });
        Ok(())
    }

    /// The next file to copy, or an error that ends the walk.
    fn step(&mut self) -> Result<Option<PlannedFile>> {
        loop {
            let Some(dir) = self.open.last_mut() else { return Ok(self.control.take()) };
            let Some(name) = dir.names.get(dir.next) else {
                self.open.pop();
                continue;
            };
            dir.next += 1;
            let path = dir.path.join(name);
            let rel = if dir.rel.is_empty() { name.to_owned() } else { format!("{}/{name}", dir.rel) };
            // Unlogged relations are reset from their init fork at the end
            // of recovery: only the `_init` fork is copied.
            let unlogged = !name.ends_with("_init") && dir.unlogged.contains(name.split(['_', '.']).next().unwrap_or(name));
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("cannot read {}", path.display()))(e)),
            };
            if meta.is_dir() {
                if !excluded(&rel, true) {
                    self.dirs.push(DirEntry { path: rel.clone(), mode: meta.permissions().mode() & 0o7777 });
                    self.enter(path, rel)?;
                }
            } else if meta.is_file() && !excluded(&rel, false) && !unlogged {
                let f = PlannedFile {
                    path: rel,
                    source: path,
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o7777,
                    mtime: meta.mtime(),
                    ctime: Some(meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec())),
                    basis: Basis::Whole,
                    id: Some(FileIdentity::of(&meta)),
                };
                if f.path == crate::pg::CONTROL_FILE {
                    self.control = Some(f);
                    continue;
                }
                return Ok(Some(f));
            }
        }
    }
}

impl Iterator for Walk {
    type Item = Result<PlannedFile>;

    fn next(&mut self) -> Option<Result<PlannedFile>> {
        if self.failed {
            return None;
        }
        let step = self.step();
        self.failed = step.is_err();
        step.transpose()
    }
}

/// The files of the backup an incremental or differential builds on, read
/// along a [`Walk`] (both in [`path_order`](crate::repo::filelist::path_order)) to give each walked file its
/// [`Basis`].
pub struct Prior<I: Iterator<Item = Result<FileEntry>>> {
    manifest: Manifest,
    files: std::iter::Peekable<I>,
    began: DateTime<Utc>,
}

impl<I: Iterator<Item = Result<FileEntry>>> Prior<I> {
    /// `prior` passed [`basis::prior_unusable`](super::basis::prior_unusable);
    /// `files` are its entries in [`path_order`](crate::repo::filelist::path_order);
    /// `began` is when this backup began.
    pub fn new(prior: Manifest, files: I, began: DateTime<Utc>) -> Self {
        Prior { manifest: prior, files: files.peekable(), began }
    }

    /// From the prior's entry of the same path: the entry that stands for
    /// `f` unread when [`basis::unread_entry`](super::basis::unread_entry)
    /// gives one, else `None` with `f.basis` set as
    /// [`basis::file_basis`](super::basis::file_basis) says. `f` must come
    /// after every file given before.
    pub fn set_basis(&mut self, f: &mut PlannedFile) -> Result<Option<FileEntry>> {
        let before = crate::repo::filelist::entry_at(&mut self.files, &f.path)?;
        if let Some(entry) = unread_entry(f, &self.manifest, before.as_ref(), self.began) {
            return Ok(Some(entry));
        }
        f.basis = file_basis(f, &self.manifest, before.as_ref());
        Ok(None)
    }
}

/// A file a [`Planner`] gives: to copy, or, with `unread`, to list as the
/// entry given there without reading it.
pub struct Planned {
    /// The file walked.
    pub file: PlannedFile,
    /// The entry that lists it unread.
    pub unread: Option<FileEntry>,
}

/// A backup's prior's entries, as [`Repository::file_reader`](crate::repo::Repository::file_reader) gives them.
pub type PriorFiles = Box<dyn Iterator<Item = Result<FileEntry>> + Send>;

/// The files a backup copies, in [`path_order`](crate::repo::filelist::path_order), each with its basis: a
/// [`Walk`] read along the prior's entries, when there is a prior.
pub struct Planner {
    walk: Walk,
    prior: Option<Prior<PriorFiles>>,
}

impl Planner {
    /// Walks `pg_data`; `prior` is the backup built on and its entries,
    /// `began` when this backup began.
    pub fn new(pg_data: &Path, prior: Option<(Manifest, PriorFiles)>, began: DateTime<Utc>) -> Result<Planner> {
        Ok(Planner { walk: Walk::new(pg_data)?, prior: prior.map(|(m, files)| Prior::new(m, files, began)) })
    }

    /// The directories walked, parents first.
    pub fn into_dirs(self) -> Vec<DirEntry> {
        self.walk.into_dirs()
    }
}

impl Iterator for Planner {
    type Item = Result<Planned>;

    fn next(&mut self) -> Option<Result<Planned>> {
        let mut f = match self.walk.next()? {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        match self.prior.as_mut().map(|p| p.set_basis(&mut f)).transpose() {
            Err(e) => {
                self.walk.failed = true;
                Some(Err(e))
            }
            Ok(unread) => Some(Ok(Planned { file: f, unread: unread.flatten() })),
        }
    }
}

/// Relation files every change of whose pages moves the page's LSN, when
/// data checksums are on: the main fork, in any segment. Not the
/// visibility map (bits cleared without WAL), not the free space map
/// (updated without WAL), not init forks, not catalog-less files.
pub fn is_page_tracked(path: &str) -> bool {
    relation_file(path).is_some_and(|(fork, _)| fork.is_empty())
}

/// For a relation file of any fork (main, `_fsm`, `_vm`, `_init`, in any
/// segment, under `global`, `base/<db>` or a tablespace's database
/// directory), its segment number (the `.N` suffix, 0 without one): the
/// files whose pages carry PostgreSQL page checksums. `None` for any other
/// file (temporary relations `t<n>_<node>` included: they are never
/// copied by PostgreSQL's base backup and never checksummed on disk).
pub fn relation_segment(path: &str) -> Option<u32> {
    relation_file(path).map(|(_, segment)| segment)
}

/// A relation file's fork suffix (`""` for the main fork, `_fsm`, `_vm`,
/// `_init`) and segment number; `None` for any other file.
fn relation_file(path: &str) -> Option<(&str, u32)> {
    let (dir, name) = path.rsplit_once('/')?;
    if !(dir == "global" || is_relation_dir(dir)) {
        return None;
    }
    let (stem, segment) = match name.split_once('.') {
        Some((stem, segment)) => (stem, digits(segment)?.parse().ok()?),
        None => (name, 0),
    };
    let (node, fork) =
        ["_fsm", "_vm", "_init"].iter().find_map(|fork| stem.strip_suffix(fork).map(|node| (node, *fork))).unwrap_or((stem, ""));
    digits(node).map(|_| (fork, segment))
}

/// `s` when it is a non-empty run of ASCII digits.
fn digits(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

/// `base/<db>` or `pg_tblspc/<oid>/<version dir>/<db>`.
fn is_relation_dir(dir: &str) -> bool {
    let parts: Vec<_> = dir.split('/').collect();
    matches!(parts.as_slice(), ["base", _] | ["pg_tblspc", _, _, _])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::filelist::path_order;

    #[test]
    fn follows_postgres_exclusion_rules() {
        for (p, d) in [
            ("pg_wal/000000010000000000000001", false),
            ("pg_stat_tmp/global.stat", false),
            ("postmaster.pid", false),
            ("backup_label", false),
            ("base/5/pg_internal.init", false),
            ("global/pg_internal.init.123", false),
            ("base/pgsql_tmp", true),
            ("pg_tblspc/16384/PG_15_202209061/pgsql_tmp", true),
            ("pg_replslot/slot1", true),
            ("pg_wal/summaries/0000000100000000010000280000000001000100.summary", false),
            ("pg_wal/archive_status/000000010000000000000001.ready", false),
        ] {
            assert!(excluded(p, d), "{p} should be skipped");
        }
        for (p, d) in [
            ("pg_wal", true),
            ("pg_wal/archive_status", true),
            ("pg_wal/summaries", true),
            ("base/5/16384", false),
            ("global/pg_control", false),
            ("postgresql.auto.conf", false),
            ("base/5/backup_label", false),
            ("pg_walx/file", false),
        ] {
            assert!(!excluded(p, d), "{p} should be copied");
        }
    }

    #[test]
    fn only_main_forks_are_page_tracked() {
        for p in ["base/5/16384", "base/5/16384.12", "global/1262", "pg_tblspc/16390/PG_15_202209061/5/16391"] {
            assert!(is_page_tracked(p), "{p}");
        }
        for p in [
            "base/5/16384_fsm",
            "base/5/16384_vm",
            "base/5/16384_vm.1",
            "base/5/16384_init",
            "base/5/PG_VERSION",
            "base/5/pg_filenode.map",
            "global/pg_control",
            "pg_xact/0000",
            "base/5/16384.",
            "base/5/16384.x",
            "16384",
            "pg_tblspc/16390/16391",
        ] {
            assert!(!is_page_tracked(p), "{p}");
        }
    }

    #[test]
    fn relation_files_of_every_fork_have_a_segment_number() {
        for (p, seg) in [
            ("base/5/16384", 0),
            ("base/5/16384.12", 12),
            ("base/5/16384_fsm", 0),
            ("base/5/16384_vm.1", 1),
            ("base/5/16384_init", 0),
            ("global/1262", 0),
            ("pg_tblspc/16390/PG_15_202209061/5/16391.3", 3),
        ] {
            assert_eq!(relation_segment(p), Some(seg), "{p}");
        }
        for p in [
            "base/5/PG_VERSION",
            "base/5/pg_filenode.map",
            "base/5/t3_16384",
            "base/5/16384_xyz",
            "base/5/_fsm",
            "base/5/16384.",
            "base/5/16384.x",
            "base/5/16384.99999999999",
            "global/pg_control",
            "pg_xact/0000",
            "pg_multixact/offsets/0000",
            "16384",
            "pg_tblspc/16390/16391",
        ] {
            assert_eq!(relation_segment(p), None, "{p}");
        }
    }

    /// A data directory to walk: `files` (path, bytes) under `root`.
    pub(crate) fn data_dir(root: &Path, files: &[(&str, &[u8])]) {
        for (path, bytes) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }

    #[test]
    fn the_walk_gives_files_in_list_order_with_tablespaces_in_place_and_the_control_file_last() {
        let data = tempfile::tempdir().unwrap();
        let space = tempfile::tempdir().unwrap();
        data_dir(
            data.path(),
            &[
                ("base/5/100", b"x"),
                ("base/5/100_init", b"x"),
                ("base/5/100_fsm", b"x"),
                ("base/5/100.1", b"x"),
                ("base/5/1000", b"x"),
                ("base/6/100", b"x"),
                ("base/6/100_fsm", b"x"),
                ("global/100", b"x"),
                ("global/pg_control", b"x"),
                ("global/pg_filenode.map", b"x"),
                ("pg_wal/000000010000000000000001", b"x"),
                ("pg_xact/0000", b"x"),
                ("postmaster.pid", b"x"),
                ("PG_VERSION", b"15"),
            ],
        );
        std::fs::create_dir_all(data.path().join("pg_wal/archive_status")).unwrap();
        data_dir(space.path(), &[("PG_15_202209061/5/200", b"x"), ("PG_15_202209061/5/200_vm", b"x")]);
        std::fs::create_dir_all(data.path().join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(space.path(), data.path().join("pg_tblspc/16384")).unwrap();
        let mut walk = Walk::new(data.path()).unwrap();
        let paths: Vec<String> = walk.by_ref().map(|f| f.unwrap().path).collect();
        assert_eq!(
            paths,
            [
                "PG_VERSION",
                "base/5/1000",
                "base/5/100_init",
                "base/6/100",
                "base/6/100_fsm",
                "global/100",
                "global/pg_filenode.map",
                "pg_tblspc/16384/PG_15_202209061/5/200",
                "pg_tblspc/16384/PG_15_202209061/5/200_vm",
                "pg_xact/0000",
                "global/pg_control",
            ]
        );
        let mut sorted = paths.clone();
        sorted.sort_by(|a, b| path_order(a, b));
        assert_eq!(paths, sorted, "the walk's order is the list's");
        let dirs: Vec<String> = walk.into_dirs().into_iter().map(|d| d.path).collect();
        for d in ["base", "base/5", "pg_wal", "pg_wal/archive_status", "pg_tblspc/16384", "pg_tblspc/16384/PG_15_202209061/5"] {
            assert!(dirs.iter().any(|x| x == d), "{d} in {dirs:?}");
        }
        assert!(Walk::new(&data.path().join("missing")).is_err(), "a data directory that cannot be read is an error");
    }

    #[test]
    fn each_walked_file_gets_the_prior_entry_of_its_own_path() {
        let stop = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let prior =
            Manifest { page_checksums: true, ..Manifest::for_test("P", crate::repo::BackupType::Full, None, stop, 0x500_0000, (1, 2)) };
        let id = super::super::basis::test_identity(1, 1);
        let entry = |p: &str| FileEntry { id, ..FileEntry::for_test(p, 1, 0) };
        // The prior lists files the walk no longer meets, and misses some
        // it meets; both orders are the list's.
        let before: Vec<FileEntry> =
            ["base/1/1", "base/1/10", "base/1/2", "base/1/3", "base/2/1", "global/1", "global/pg_control"].map(entry).to_vec();
        let mut prior = Prior::new(prior, before.into_iter().map(Ok), stop);
        let walked = ["base/1/10", "base/1/11", "base/1/3", "base/10/1", "global/1", "pg_xact/0000", "global/pg_control"];
        let bases: Vec<bool> = walked
            .iter()
            .map(|p| {
                let mut f = PlannedFile {
                    path: (*p).into(),
                    source: p.into(),
                    size: 1,
                    mode: 0o600,
                    mtime: 0,
                    ctime: None,
                    basis: Basis::Whole,
                    id,
                };
                assert_eq!(prior.set_basis(&mut f).unwrap(), None, "no ctime recorded: read");
                f.delta()
            })
            .collect();
        assert_eq!(bases, [true, false, true, false, true, false, false]);

        let failing = vec![Ok(entry("base/1/1")), Err(Error::Corrupt("damaged list".into()))];
        let mut prior =
            Prior::new(Manifest::for_test("P", crate::repo::BackupType::Full, None, stop, 0x500_0000, (1, 2)), failing.into_iter(), stop);
        let mut f =
            PlannedFile { path: "base/2/1".into(), source: "x".into(), size: 1, mode: 0, mtime: 0, ctime: None, basis: Basis::Whole, id };
        assert!(prior.set_basis(&mut f).unwrap_err().to_string().contains("damaged list"));
    }
}
