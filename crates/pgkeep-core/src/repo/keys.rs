//! Every key of a stanza's objects, relative to the stanza, built in one
//! place and laid out as `docs/repository-format.md` says:
//!
//! ```text
//! stanza.json                                   which cluster
//! lock/<n>.json                                 the stanza lock
//! archive/<tli+log>/<segment>-<blake3><ext>     archived WAL (system 1)
//! archive/history/<tli>.history-<blake3><ext>   timeline history files
//! archive-<n>/...                               the same, for system n > 1
//! backup/<label>/pg_data/<path><ext>            a file (or .part<k>)
//! backup/<label>/bundle/<n>                     small files, concatenated
//! backup/<label>/partial.json                   checkpoint while copying
//! backup/<label>/manifest.json                  written last
//! ```

use crate::types::{BackupLabel, WalFileName};

/// The stanza's metadata.
pub const STANZA: &str = "stanza.json";
/// The directory of the lock's generations.
pub const LOCK_DIR: &str = "lock";
/// The WAL archive of the stanza's first system.
pub const ARCHIVE_DIR: &str = "archive";
/// The backups.
pub const BACKUP_DIR: &str = "backup";
/// A backup's checkpoint while it copies.
pub const CHECKPOINT: &str = "partial.json";
/// A backup's manifest.
pub const MANIFEST: &str = "manifest.json";

/// Generation `n` of the lock.
pub fn lock(generation: u64) -> String {
    format!("{LOCK_DIR}/{generation}.json")
}

/// The WAL archive of system `id` of the stanza's history (1 is the one
/// it was created for, and keeps the name it had before there was a
/// history).
pub fn archive(id: u32) -> String {
    match id {
        0 | 1 => ARCHIVE_DIR.to_owned(),
        n => format!("{ARCHIVE_DIR}-{n}"),
    }
}

/// Whether `key` lies in a WAL archive (of any system).
pub fn is_archive(key: &str) -> bool {
    let first = key.split('/').next().unwrap_or_default();
    first == ARCHIVE_DIR || first.strip_prefix(ARCHIVE_DIR).and_then(|r| r.strip_prefix('-')).is_some_and(|n| n.parse::<u32>().is_ok())
}

/// The directory of archive `archive` that holds archived copies of `name`.
pub fn wal_dir(archive: &str, name: &WalFileName) -> String {
    format!("{archive}/{}", name.archive_dir())
}

/// An archived copy of `name` in archive `archive` whose content has
/// BLAKE3 `checksum`, stored with extension `ext`.
pub fn wal(archive: &str, name: &WalFileName, checksum: &str, ext: &str) -> String {
    format!("{}/{}-{checksum}{ext}", wal_dir(archive, name), name.as_str())
}

/// A backup's directory.
pub fn backup(label: &BackupLabel) -> String {
    format!("{BACKUP_DIR}/{label}")
}

/// A backup's manifest.
pub fn manifest(label: &BackupLabel) -> String {
    format!("{}/{MANIFEST}", backup(label))
}

/// Whether `key` is a backup's manifest.
pub fn is_manifest(key: &str) -> bool {
    key.starts_with(&format!("{BACKUP_DIR}/")) && key.ends_with(&format!("/{MANIFEST}"))
}

/// A backup's checkpoint.
pub fn checkpoint(label: &BackupLabel) -> String {
    format!("{}/{CHECKPOINT}", backup(label))
}

/// Chunk `n` of a backup's checkpoint: the entries recorded since the
/// chunk before.
pub fn checkpoint_chunk(label: &BackupLabel, n: u32) -> String {
    format!("{}/partial.{n}.json", backup(label))
}

/// Whether `key` (in a backup's directory) is its checkpoint or one of its
/// chunks.
pub fn is_checkpoint(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    name == CHECKPOINT || name.strip_prefix("partial.").and_then(|n| n.strip_suffix(".json")).is_some_and(|n| n.parse::<u32>().is_ok())
}

/// The prefix of a backup's bundles.
pub fn bundles(label: &BackupLabel) -> String {
    format!("{}/bundle", backup(label))
}

/// A backup's file list (repository format 3), `ext` its compression's
/// extension.
pub fn file_list(label: &BackupLabel, ext: &str) -> String {
    format!("{}/files.jsonl{ext}", backup(label))
}

/// A file of a backup stored as an object of its own: `name` is its path
/// in the data directory (with `.part<k>` for a part), `ext` its
/// compression's extension.
pub fn file(label: &BackupLabel, name: &str, ext: &str) -> String {
    format!("{}/pg_data/{name}{ext}", backup(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_those_the_format_document_names() {
        let l = BackupLabel("20261201-100000F".into());
        assert_eq!(manifest(&l), "backup/20261201-100000F/manifest.json");
        assert!(is_manifest(&manifest(&l)) && !is_manifest(&checkpoint(&l)));
        assert_eq!(checkpoint(&l), "backup/20261201-100000F/partial.json");
        assert_eq!(file(&l, "base/5/16384.part1", ".zst"), "backup/20261201-100000F/pg_data/base/5/16384.part1.zst");
        assert_eq!(bundles(&l), "backup/20261201-100000F/bundle");
        assert_eq!(file_list(&l, ".zst"), "backup/20261201-100000F/files.jsonl.zst");
        assert_eq!(lock(3), "lock/3.json");
        let seg = WalFileName::parse("000000010000000000000003").unwrap();
        assert_eq!(wal(&archive(1), &seg, "ab", ".zst"), "archive/0000000100000000/000000010000000000000003-ab.zst");
        let hist = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(wal_dir(&archive(1), &hist), "archive/history");
        assert_eq!(wal_dir(&archive(2), &hist), "archive-2/history");
        assert!(is_archive("archive-2/history/x") && is_archive("archive/0000000100000000/x"));
        assert!(!is_archive("archived/x") && !is_archive("archive-x/y") && !is_archive("backup/archive"));
    }
}
