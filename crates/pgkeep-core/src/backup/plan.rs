//! What a backup copies: a walk of the data directory and its tablespaces,
//! with the rules of PostgreSQL's own base backup about what to leave out
//! (see "Backing Up the Data Directory" in the PostgreSQL documentation and
//! `basebackup.c`).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::repo::manifest::FileIdentity;
use crate::repo::{DirEntry, FileEntry, Manifest, Tablespace};

use super::basis::{file_basis, Basis};

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
}

/// Everything a backup will copy.
#[derive(Debug, Default)]
pub struct BackupPlan {
    /// Directories, parents first.
    pub dirs: Vec<DirEntry>,
    /// Files.
    pub files: Vec<PlannedFile>,
}

impl BackupPlan {
    /// Total planned bytes.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
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

/// Walks `pg_data` and the tablespaces into a plan.
pub fn plan(pg_data: &Path, tablespaces: &[Tablespace]) -> Result<BackupPlan> {
    let mut plan = BackupPlan::default();
    walk(pg_data, "", &mut plan, tablespaces)?;
    for t in tablespaces {
        let link = format!("pg_tblspc/{}", t.oid);
        walk(&pg_data.join(&link), &link, &mut plan, &[])?;
    }
    drop_unlogged(&mut plan);
    Ok(plan)
}

fn walk(dir: &Path, rel: &str, plan: &mut BackupPlan, tablespaces: &[Tablespace]) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // A directory dropped during the backup: WAL replay recreates what matters.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot read directory {}", dir.display()))(e)),
    };
    let mut names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        let Some(name) = name.to_str() else { continue };
        let path = dir.join(name);
        let child = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()))(e)),
        };
        if meta.is_dir() {
            if excluded(&child, true) {
                continue;
            }
            plan.dirs.push(DirEntry { path: child.clone(), mode: meta.permissions().mode() & 0o7777 });
            // Tablespace links are walked separately, under their own entry.
            let is_tablespace_link = rel == "pg_tblspc" && tablespaces.iter().any(|t| t.oid.to_string() == name);
            if !is_tablespace_link {
                walk(&path, &child, plan, tablespaces)?;
            }
        } else if meta.is_file() && !excluded(&child, false) {
            plan.files.push(PlannedFile {
                path: child,
                source: path,
                size: meta.len(),
                mode: meta.permissions().mode() & 0o7777,
                mtime: meta.mtime(),
                basis: Basis::Whole,
                id: Some(FileIdentity::of(&meta)),
            });
        }
    }
    Ok(())
}

/// Turns a plan into one built on `prior`, which passed
/// [`basis::prior_unusable`](super::basis::prior_unusable): each file is
/// copied as [`basis::file_basis`](super::basis::file_basis) says.
pub fn incremental(plan: &mut BackupPlan, prior: &Manifest, prior_files: &[FileEntry]) {
    let before: HashMap<&str, &FileEntry> = prior_files.iter().map(|f| (f.path.as_str(), f)).collect();
    for f in &mut plan.files {
        f.basis = file_basis(f, prior, before.get(f.path.as_str()).copied());
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

/// Unlogged relations are reset from their init fork at the end of
/// recovery: copy only the `_init` fork, never the other forks.
fn drop_unlogged(plan: &mut BackupPlan) {
    let unlogged: HashSet<(String, String)> = plan
        .files
        .iter()
        .filter_map(|f| {
            let (dir, name) = f.path.rsplit_once('/')?;
            let rel = name.strip_suffix("_init")?;
            is_relation_dir(dir).then(|| (dir.to_owned(), rel.to_owned()))
        })
        .collect();
    if unlogged.is_empty() {
        return;
    }
    plan.files.retain(|f| {
        let Some((dir, name)) = f.path.rsplit_once('/') else { return true };
        if name.ends_with("_init") {
            return true;
        }
        let relfilenode = name.split(['_', '.']).next().unwrap_or(name);
        !unlogged.contains(&(dir.to_owned(), relfilenode.to_owned()))
    });
}

/// `base/<db>` or `pg_tblspc/<oid>/<version dir>/<db>`.
fn is_relation_dir(dir: &str) -> bool {
    let parts: Vec<_> = dir.split('/').collect();
    matches!(parts.as_slice(), ["base", _] | ["pg_tblspc", _, _, _])
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keeps_only_the_init_fork_of_unlogged_relations() {
        let f = |p: &str| PlannedFile { path: p.into(), source: p.into(), size: 1, mode: 0o600, mtime: 0, basis: Basis::Whole, id: None };
        let mut plan = BackupPlan {
            dirs: vec![],
            files: ["base/5/100", "base/5/100_init", "base/5/100_fsm", "base/5/100.1", "base/5/1000", "base/6/100", "global/100"]
                .into_iter()
                .map(f)
                .collect(),
        };
        drop_unlogged(&mut plan);
        let kept: Vec<_> = plan.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(kept, ["base/5/100_init", "base/5/1000", "base/6/100", "global/100"]);
    }
}
