//! The one rule that lets a backup skip work: whether a differential or
//! incremental backup may build on a prior backup at all, and, file by
//! file, what it may leave out. Pure functions; `docs/incremental.md`
//! gives the argument for each condition from PostgreSQL's source, and
//! names the test that breaks each on purpose.
//!
//! A backup builds on a prior only when all of these hold (else it is
//! taken full, and says why):
//! - the same system (`system-id`) and the same data checksum state as
//!   when the prior was taken: `pg_checksums` rewrites every page's
//!   checksum without moving its LSN;
//! - the prior is in this cluster's past: on its timeline, or on an
//!   ancestor that this timeline left at or after the prior's end (an
//!   in-place restore to an earlier point, a failover or `pg_rewind` make
//!   a history in which later backups never happened);
//! - this backup starts after the prior ended;
//! - it reads the same data directory as the prior did (a standby's files
//!   are other files than the primary's, and a data directory cloned
//!   again is another directory).
//!
//! Then each file is, against the prior's entry for the same path:
//! - not read at all ([`unread_entry`]) when it is the same file with the
//!   size, mtime and ctime the prior recorded, that ctime a whole second
//!   before the prior began, and this backup began after the prior did:
//!   every write moves a file's ctime (PostgreSQL writes its files only
//!   with `write`, `ftruncate` and `fallocate`, never through `mmap`), so
//!   the file holds what the prior read;
//! - copied whole when the prior has no such path, or it is another file
//!   now (its [`FileIdentity`](crate::repo::manifest::FileIdentity) differs: the file was removed and created
//!   again, as `CREATE DATABASE ... STRATEGY FILE_COPY` does with pages
//!   that keep their template's old LSNs);
//! - with data checksums on, for the main fork of a relation: only the
//!   pages whose LSN is at or after the prior's start ([`Basis::Pages`]),
//!   every hint-bit change being WAL-logged then;
//! - with data checksums off, hint bits and the all-visible flag of heap
//!   pages change without moving their LSN: a relation file is left out
//!   only when its size and mtime are what the prior recorded and that
//!   mtime was a whole second before the prior began ([`Basis::Unchanged`]),
//!   else copied whole;
//! - every other file (visibility maps, free space maps, init forks,
//!   non-relation files) is copied whole: visibility-map bits are cleared
//!   without WAL and without moving the map page's LSN.

use chrono::{DateTime, Utc};

use crate::repo::manifest::{FileIdentity, Part};
use crate::repo::{FileEntry, Manifest, ServerRole};
use crate::types::{Lsn, SystemId, TimelineHistory, TimelineId};

use super::plan::{is_page_tracked, relation_segment, PlannedFile};

/// How a file is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// All of it.
    Whole,
    /// Only the pages whose LSN is at or after `since` (the prior's start),
    /// and those that cannot be judged by their LSN.
    Pages {
        /// The prior backup's start LSN.
        since: Lsn,
    },
    /// Nothing: the file is byte for byte what the prior stored. It is
    /// still read, for its page checksums and its content hash.
    Unchanged,
}

/// The cluster as a backup about to start finds it.
#[derive(Debug, Clone)]
pub struct ClusterNow {
    /// Its system identifier.
    pub system_id: SystemId,
    /// Whether data checksums are on.
    pub page_checksums: bool,
    /// The timeline WAL is written on.
    pub timeline: TimelineId,
    /// The WAL insert position before the backup starts (the backup's
    /// own start is after it).
    pub lsn: Lsn,
    /// This timeline's history; `None` when its history file could not be
    /// found (on timeline 1 there is none to find).
    pub history: Option<TimelineHistory>,
    /// The server the backup reads, and its data directory.
    pub from: ServerRole,
    /// The identity of that data directory.
    pub data_directory: FileIdentity,
}

/// Why a backup cannot build on `prior`; `None` when it can.
pub fn prior_unusable(prior: &Manifest, now: &ClusterNow) -> Option<String> {
    let onoff = |b: bool| if b { "on" } else { "off" };
    if prior.system_id != now.system_id {
        return Some(format!("backup {} is of another system ({}, this cluster is {})", prior.label, prior.system_id, now.system_id));
    }
    if prior.page_checksums != now.page_checksums {
        return Some(format!(
            "data checksums were {} when backup {} was taken and are {} now (pg_checksums rewrote the pages)",
            onoff(prior.page_checksums),
            prior.label,
            onoff(now.page_checksums)
        ));
    }
    if prior.timeline != now.timeline {
        let Some(history) = &now.history else {
            return Some(format!(
                "backup {} is on timeline {} and the history of timeline {} is neither in pg_wal nor in the repository, so it cannot be shown to be in this cluster's past",
                prior.label, prior.timeline, now.timeline
            ));
        };
        if !history.includes(prior.timeline, prior.stop_lsn) {
            let left = match history.switch_point(prior.timeline) {
                Some(at) => format!("which left timeline {} at {at}", prior.timeline),
                None => format!("which does not descend from timeline {}", prior.timeline),
            };
            return Some(format!(
                "backup {} (timeline {}, ending at {}) is not in the past of timeline {}, {left} (a restore to an earlier point, a failover or pg_rewind)",
                prior.label, prior.timeline, prior.stop_lsn, now.timeline
            ));
        }
    }
    // Manifests written before pgkeep recorded the directory are of
    // backups of the primary; their files' identities still decide.
    let same_directory = match &prior.data_directory {
        Some(then) => then.same_file(&now.data_directory),
        None => now.from == ServerRole::Primary,
    };
    if !same_directory {
        return Some(format!(
            "backup {} read another data directory (of the {}) than this one reads (of the {})",
            prior.label, prior.from, now.from
        ));
    }
    if now.lsn <= prior.stop_lsn {
        return Some(format!("the cluster's WAL position {} is not after the end of backup {} ({})", now.lsn, prior.label, prior.stop_lsn));
    }
    None
}

/// BLAKE3, hex, of no bytes: the checksum of a delta that stores no page.
const EMPTY_HASH: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

/// The entry that lists `f`, unread, in a backup that began at `began`
/// built on `prior`, whose entry for the same path is `before`; `None`
/// when `f` must be read (pure). It stands for the prior's copy: a delta
/// of no page whose `content` is the prior's.
///
/// `f` is left unread only when it is the same file with the size, mtime
/// and ctime (to the nanosecond) the prior recorded, that ctime a whole
/// second before the prior began, and this backup began after the prior
/// did. The prior looked at the file after it began; a write since then
/// would have moved the ctime to a time after that look (`write`,
/// `ftruncate` and `fallocate` all set it; nothing sets it back, as
/// `touch -d` does an mtime), past the recorded one by the whole second
/// that the kernel's coarse clock cannot blur. A clock stepped back below
/// the prior's start could give a write the recorded ctime again, hence
/// the last condition. The prior's entry must have no failing page (those
/// are checked again) and say what its content is (older manifests may
/// not). `global/pg_control` is always read: it is rewritten in place all
/// the time and copied last, as the end of a backup from a standby.
pub fn unread_entry(f: &PlannedFile, prior: &Manifest, before: Option<&FileEntry>, began: DateTime<Utc>) -> Option<FileEntry> {
    let before = before?;
    let (Some(_), Some(then)) = (f.ctime, before.ctime) else { return None };
    let settled = then.div_euclid(1_000_000_000) + 1 < prior.start_time.timestamp();
    let untouched = f.same_file_as(before) && f.size == before.size && f.mtime == before.mtime && f.ctime_unmoved(before) && settled;
    if !untouched || began < prior.start_time || f.path == crate::pg::CONTROL_FILE || before.checksum_error_pages() > 0 {
        return None;
    }
    // What the prior read: for a whole copy, the checksum of its content;
    // for a delta, its `content`.
    let read = |content: &Option<String>, checksum: &str| match before.delta {
        true => content.clone(),
        false => Some(checksum.to_owned()).filter(|c| !c.is_empty()),
    };
    let nothing = EMPTY_HASH.to_owned();
    let parts = before
        .parts
        .iter()
        .map(|p| {
            let content = Some(read(&p.content, &p.checksum)?);
            Some(Part { start: p.start, size: p.size, key: None, repo_size: 0, checksum: nothing.clone(), pages: 0, content })
        })
        .collect::<Option<Vec<Part>>>()?;
    let (checksum, content) = match parts.is_empty() {
        true => (nothing, Some(read(&before.content, &before.checksum)?)),
        false => (String::new(), None),
    };
    Some(FileEntry {
        path: f.path.clone(),
        size: f.size,
        mode: f.mode,
        mtime: f.mtime,
        ctime: f.ctime,
        checksum,
        key: None,
        repo_size: 0,
        delta: true,
        pages: 0,
        offset: None,
        content,
        checksum_errors: Vec::new(),
        checksum_errors_unlisted: 0,
        parts,
        id: f.id,
    })
}

/// How to copy `f` in a backup built on `prior`, whose entry for the same
/// path is `before`, when it must be read (pure). `prior` passed [`prior_unusable`], so its
/// checksum state is the cluster's.
pub fn file_basis(f: &PlannedFile, prior: &Manifest, before: Option<&FileEntry>) -> Basis {
    let Some(before) = before else { return Basis::Whole };
    if !f.same_file_as(before) {
        return Basis::Whole;
    }
    if prior.page_checksums {
        return match is_page_tracked(&f.path) {
            true => Basis::Pages { since: prior.start_lsn },
            false => Basis::Whole,
        };
    }
    // A ctime recorded on both sides must be the same too: an mtime can
    // be put back (`touch -d`, `cp -p`), a ctime cannot.
    let untouched = relation_segment(&f.path).is_some()
        && f.size == before.size
        && f.mtime == before.mtime
        && f.ctime_unmoved(before)
        && before.mtime + 1 < prior.start_time.timestamp();
    if untouched {
        Basis::Unchanged
    } else {
        Basis::Whole
    }
}

/// The identity a planned file carries, for tests.
#[cfg(test)]
pub(crate) fn test_identity(ino: u64, birth: i128) -> Option<FileIdentity> {
    Some(FileIdentity { dev: 1, ino, birth: Some(birth) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::BackupType;

    fn prior(checksums: bool) -> Manifest {
        let stop = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&chrono::Utc);
        Manifest { page_checksums: checksums, ..Manifest::for_test("P", BackupType::Full, None, stop, 0x500_0000, (1, 2)) }
    }

    fn now(timeline: u32, lsn: u64, history: Option<&str>) -> ClusterNow {
        ClusterNow {
            system_id: SystemId(1),
            page_checksums: true,
            timeline: TimelineId(timeline),
            lsn: Lsn(lsn),
            history: history.map(|h| TimelineHistory::parse(TimelineId(timeline), h).unwrap()),
            from: ServerRole::Primary,
            data_directory: FileIdentity { dev: 1, ino: 2, birth: Some(3) },
        }
    }

    #[test]
    fn a_prior_read_from_another_data_directory_is_not_built_on() {
        let mut p = prior(true);
        let here = now(1, 0x600_0000, None);
        assert_eq!(prior_unusable(&p, &here), None, "an old manifest of the primary, read from the primary");
        let standby =
            ClusterNow { from: ServerRole::Standby, data_directory: FileIdentity { dev: 1, ino: 9, birth: Some(4) }, ..here.clone() };
        let e = prior_unusable(&p, &standby).unwrap();
        assert!(e.contains("another data directory (of the primary)") && e.contains("(of the standby)"), "{e}");
        p.data_directory = Some(standby.data_directory);
        p.from = ServerRole::Standby;
        assert_eq!(prior_unusable(&p, &standby), None, "the same standby");
        assert!(prior_unusable(&p, &here).is_some(), "back on the primary");
        let recloned = ClusterNow { data_directory: FileIdentity { dev: 1, ino: 9, birth: Some(5) }, ..standby };
        assert!(prior_unusable(&p, &recloned).is_some(), "the standby's directory created again");
    }

    #[test]
    fn a_prior_must_be_in_this_clusters_past() {
        let p = prior(true);
        assert_eq!(prior_unusable(&p, &now(1, 0x600_0000, None)), None);
        // Restored from the prior itself and promoted: timeline 2 starts
        // after the prior's end.
        assert_eq!(prior_unusable(&p, &now(2, 0x600_0000, Some("1\t0/5000000\tx"))), None);
        assert_eq!(prior_unusable(&p, &now(3, 0x900_0000, Some("1\t0/5000100\tx\n2\t0/8000000\ty"))), None);
        // Restored to a point before the prior's end.
        let e = prior_unusable(&p, &now(2, 0x600_0000, Some("1\t0/4FFFFFF\tx"))).unwrap();
        assert!(e.contains("left timeline 1 at 0/4FFFFFF"), "{e}");
        let e = prior_unusable(&p, &now(3, 0x600_0000, Some("2\t0/4000000\tx"))).unwrap();
        assert!(e.contains("does not descend from timeline 1"), "{e}");
        let e = prior_unusable(&p, &now(2, 0x600_0000, None)).unwrap();
        assert!(e.contains("history of timeline 2"), "{e}");
        let e = prior_unusable(&p, &now(1, 0x500_0000, None)).unwrap();
        assert!(e.contains("not after the end"), "{e}");
    }

    #[test]
    fn a_change_of_checksum_state_or_system_makes_a_full_backup() {
        let e = prior_unusable(&prior(false), &now(1, 0x600_0000, None)).unwrap();
        assert!(e.contains("data checksums were off") && e.contains("are on now"), "{e}");
        let other = ClusterNow { system_id: SystemId(2), ..now(1, 0x600_0000, None) };
        assert!(prior_unusable(&prior(true), &other).unwrap().contains("another system"));
    }

    fn planned(path: &str, id: Option<FileIdentity>, size: u64, mtime: i64) -> PlannedFile {
        PlannedFile { path: path.into(), source: path.into(), size, mode: 0o600, mtime, ctime: None, basis: Basis::Whole, id }
    }

    fn entry(path: &str, id: Option<FileIdentity>, size: u64, mtime: i64) -> FileEntry {
        FileEntry { id, ..FileEntry::for_test(path, size, mtime) }
    }

    #[test]
    fn only_the_main_fork_of_the_same_file_is_copied_by_page_lsn() {
        let p = prior(true);
        let since = Basis::Pages { since: p.start_lsn };
        let id = test_identity(7, 100);
        let basis = |path: &str, now: Option<FileIdentity>, then: Option<FileIdentity>| {
            file_basis(&planned(path, now, 8192, 5), &p, Some(&entry(path, then, 8192, 5)))
        };
        assert_eq!(basis("base/5/16384", id, id), since);
        assert_eq!(basis("base/5/16384.3", id, id), since);
        assert_eq!(basis("base/5/16384_vm", id, id), Basis::Whole, "visibility-map bits are cleared without WAL");
        assert_eq!(basis("base/5/16384_fsm", id, id), Basis::Whole);
        assert_eq!(basis("base/5/16384_init", id, id), Basis::Whole);
        assert_eq!(basis("global/pg_control", id, id), Basis::Whole);
        assert_eq!(basis("base/5/16384", id, test_identity(7, 101)), Basis::Whole, "re-created: another file");
        assert_eq!(basis("base/5/16384", id, test_identity(8, 100)), Basis::Whole);
        assert_eq!(basis("base/5/16384", id, None), Basis::Whole, "a prior that did not record identities");
        assert_eq!(basis("base/5/16384", None, id), Basis::Whole);
        assert_eq!(file_basis(&planned("base/5/1", id, 1, 1), &p, None), Basis::Whole, "new file");
        // A volume mounted again under another device number: the birth
        // time still tells the file.
        let moved = Some(FileIdentity { dev: 99, ..id.unwrap() });
        assert_eq!(basis("base/5/16384", moved, id), since);
        let no_birth = Some(FileIdentity { dev: 1, ino: 7, birth: None });
        assert_eq!(basis("base/5/16384", no_birth, no_birth), since);
        assert_eq!(basis("base/5/16384", Some(FileIdentity { dev: 2, ino: 7, birth: None }), no_birth), Basis::Whole);
    }

    #[test]
    fn the_empty_hash_is_blake3_of_nothing() {
        assert_eq!(EMPTY_HASH, blake3::hash(b"").to_hex().as_str());
    }

    /// The rule that leaves a file unread, broken one condition at a time.
    #[test]
    fn a_file_is_left_unread_only_when_its_ctime_proves_it_unwritten_since_the_prior_looked() {
        let p = prior(true);
        let begun = p.start_time;
        let began = begun + chrono::Duration::seconds(60);
        let sec = 1_000_000_000i64;
        let settled = (begun.timestamp() - 2) * sec + 123;
        let id = test_identity(7, 100);
        let now = |path: &str, ctime: i64| PlannedFile { ctime: Some(ctime), ..planned(path, id, 8192, 5) };
        let then = |path: &str, ctime: i64| FileEntry {
            ctime: Some(ctime),
            checksum: "whole".into(),
            key: Some("k".into()),
            repo_size: 99,
            ..entry(path, id, 8192, 5)
        };
        let unread = |f: &PlannedFile, e: &FileEntry, began| unread_entry(f, &p, Some(e), began);
        // Any file, whatever its fork or kind, with checksums on or off.
        for path in ["base/5/16384", "base/5/16384_vm", "base/5/16384_fsm", "pg_xact/0000", "postgresql.conf"] {
            let e = unread(&now(path, settled), &then(path, settled), began).unwrap_or_else(|| panic!("{path} left unread"));
            assert!(e.delta && e.key.is_none() && e.pages == 0 && e.repo_size == 0, "{e:?}");
            assert_eq!(e.content.as_deref(), Some("whole"), "the content is what the prior read");
            assert_eq!((e.ctime, e.id, e.size), (Some(settled), id, 8192));
        }
        let off = Manifest { page_checksums: false, ..prior(false) };
        assert!(unread_entry(&now("base/5/1", settled), &off, Some(&then("base/5/1", settled)), began).is_some());
        let f = now("base/5/1", settled);
        let e = then("base/5/1", settled);
        assert!(unread(&PlannedFile { ctime: Some(settled + 1), ..f.clone() }, &e, began).is_none(), "written since: ctime moved");
        assert!(unread(&PlannedFile { mtime: 6, ..f.clone() }, &e, began).is_none(), "mtime moved");
        assert!(unread(&PlannedFile { size: 16384, ..f.clone() }, &e, began).is_none(), "extended");
        assert!(unread(&PlannedFile { id: test_identity(7, 101), ..f.clone() }, &e, began).is_none(), "re-created");
        assert!(unread(&PlannedFile { ctime: None, ..f.clone() }, &e, began).is_none());
        assert!(unread(&f, &FileEntry { ctime: None, ..e.clone() }, began).is_none(), "a prior that recorded no ctime");
        let recent = (begun.timestamp() - 1) * sec;
        assert!(unread(&now("base/5/1", recent), &then("base/5/1", recent), began).is_none(), "changed in the second before the prior");
        assert!(unread(&f, &e, begun - chrono::Duration::seconds(1)).is_none(), "the clock went back below the prior's start");
        assert!(unread(&f, &FileEntry { checksum_errors: vec![3], ..e.clone() }, began).is_none(), "failing pages are checked again");
        let control = now(crate::pg::CONTROL_FILE, settled);
        assert!(unread(&control, &then(crate::pg::CONTROL_FILE, settled), began).is_none());
        assert!(unread_entry(&f, &p, None, began).is_none(), "new file");

        // A prior delta gives its content; one without is read again.
        let delta = FileEntry { delta: true, content: Some("as read".into()), ..e.clone() };
        assert_eq!(unread(&f, &delta, began).unwrap().content.as_deref(), Some("as read"));
        assert!(unread(&f, &FileEntry { content: None, ..delta }, began).is_none());
        // Parts keep their ranges and contents.
        let part = |start, content: Option<&str>, checksum: &str| Part {
            start,
            size: 4096,
            key: Some("p".into()),
            repo_size: 9,
            checksum: checksum.into(),
            pages: 0,
            content: content.map(str::to_owned),
        };
        let parted = FileEntry { parts: vec![part(0, None, "a"), part(4096, None, "b")], key: None, checksum: String::new(), ..e.clone() };
        let got = unread(&f, &parted, began).unwrap();
        let parts: Vec<_> = got.parts.iter().map(|p| (p.start, p.key.clone(), p.content.clone().unwrap())).collect();
        assert_eq!(parts, [(0, None, "a".to_owned()), (4096, None, "b".to_owned())]);
        assert!(got.content.is_none() && got.checksum.is_empty());
    }

    #[test]
    fn without_checksums_a_relation_file_is_left_out_only_when_untouched_since_before_the_prior() {
        let p = prior(false);
        let begun = p.start_time.timestamp();
        let id = test_identity(7, 100);
        let basis = |mtime_then: i64, mtime_now: i64, size_now: u64| {
            file_basis(&planned("base/5/16384", id, size_now, mtime_now), &p, Some(&entry("base/5/16384", id, 8192, mtime_then)))
        };
        assert_eq!(basis(begun - 2, begun - 2, 8192), Basis::Unchanged);
        assert_eq!(basis(begun - 1, begun - 1, 8192), Basis::Whole, "written in the second before the prior began");
        assert_eq!(basis(begun - 2, begun + 5, 8192), Basis::Whole, "written since");
        assert_eq!(basis(begun - 2, begun - 2, 16384), Basis::Whole, "extended");
        // Its mtime put back after a write: the ctime says so.
        let f = PlannedFile { ctime: Some(7), ..planned("base/5/16384", id, 8192, begun - 2) };
        let e = FileEntry { ctime: Some(6), ..entry("base/5/16384", id, 8192, begun - 2) };
        assert_eq!(file_basis(&f, &p, Some(&e)), Basis::Whole, "ctime moved");
        assert_eq!(file_basis(&f, &p, Some(&FileEntry { ctime: None, ..e })), Basis::Unchanged, "a prior without ctime");
        let vm = file_basis(&planned("pg_xact/0000", id, 8192, begun - 9), &p, Some(&entry("pg_xact/0000", id, 8192, begun - 9)));
        assert_eq!(vm, Basis::Whole, "not a relation file");
    }
}
