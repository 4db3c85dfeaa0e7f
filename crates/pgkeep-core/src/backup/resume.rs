//! Resuming a backup that was interrupted (killed, or its machine lost).
//!
//! While a backup copies, it keeps a checkpoint, `partial.json` in its
//! directory: its type, prior and compression, when it started, and the
//! entries of the files already stored as objects of their own (bundled
//! small files are cheap to copy again and are not listed). The checkpoint
//! is written before the first file is copied and then every few seconds
//! while files finish. Backups and expiry run under the stanza lock
//! ([`crate::repo::lock`]), so a directory under `backup/` without a
//! manifest that one of them sees is an abandoned backup.
//!
//! The next backup of the same type on the same prior takes an abandoned
//! one over, keeping its label, and keeps a stored file only when that is
//! provably what it would store now (see [`reusable`]): the file's size and
//! mtime are those recorded, and that mtime is a whole second before the
//! interrupted attempt began. A file written during the attempt's copy can
//! hold a torn page whose repair is a full-page image in WAL from *before*
//! the new backup's start, which recovery from the new backup never
//! replays; a file last written before the attempt began cannot be torn.
//! Every other object of the abandoned directory is deleted before copying.
//! Abandoned backups that cannot be resumed are removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::codec::Compress;
use crate::error::{Error, Result};
use crate::repo::{BackupType, FileEntry, Repository};
use crate::types::BackupLabel;

use super::PlannedFile;
pub use crate::repo::partial::{Checkpoint, Unfinished, CHECKPOINT};

/// How often a running backup rewrites its checkpoint (when files finished).
const INTERVAL: Duration = Duration::from_secs(3);

/// The newest abandoned backup that a backup of `kind` on `prior` with
/// `compress`, of `system`, can take over (pure). An attempt of another
/// system (interrupted before pg_upgrade) is never taken over: the new
/// backup would get its older label.
pub fn choose<'a>(
    abandoned: &'a [Unfinished],
    kind: BackupType,
    prior: Option<&BackupLabel>,
    compress: Compress,
    system: crate::types::SystemId,
) -> Option<&'a Checkpoint> {
    abandoned
        .iter()
        .rev()
        .filter_map(|u| u.checkpoint.as_ref())
        .find(|c| c.kind == kind && c.prior.as_ref() == prior && c.compress == compress && c.system_id.is_none_or(|s| s == system))
}

/// The entries of `interrupted` that the new attempt keeps for the files
/// it plans (pure; see [`Reuse::take`]).
pub fn reusable(interrupted: &Checkpoint, planned: &[PlannedFile], stored: &HashMap<String, u64>) -> Vec<FileEntry> {
    let mut reuse = Reuse::new(interrupted.files.clone(), interrupted.start_time, stored.clone());
    planned.iter().filter_map(|f| reuse.take(f)).collect()
}

/// The entries of an interrupted attempt, offered to the files of a new
/// one as it walks them.
pub struct Reuse {
    by_path: HashMap<String, FileEntry>,
    began: i64,
    stored: HashMap<String, u64>,
}

impl Reuse {
    /// `files` are the attempt's entries, `began` its start, `stored` the
    /// objects in its directory (key → size).
    pub fn new(files: Vec<FileEntry>, began: DateTime<Utc>, stored: HashMap<String, u64>) -> Reuse {
        Reuse { by_path: files.into_iter().map(|e| (e.path.clone(), e)).collect(), began: began.timestamp(), stored }
    }

    /// The entry kept for `f`, if any (then taken out): same path, file
    /// identity, size and mtime as recorded, that mtime a whole second
    /// before the interrupted attempt began, the same kind of copy (whole
    /// or delta), and its objects still stored with their recorded sizes.
    pub fn take(&mut self, f: &PlannedFile) -> Option<FileEntry> {
        let e = self.by_path.get(&f.path)?;
        let same_file = matches!((&e.id, &f.id), (Some(a), Some(b)) if a.same_file(b));
        let unchanged = same_file && e.size == f.size && e.mtime == f.mtime && e.mtime < self.began;
        let same_kind = e.delta == f.delta() && e.offset.is_none();
        let object_there = e.own_objects().iter().all(|(key, size)| self.stored.get(*key) == Some(size));
        match unchanged && same_kind && object_there {
            true => self.by_path.remove(&f.path),
            false => None,
        }
    }
}

/// Keeps the checkpoint of a running backup up to date.
pub struct Checkpointer {
    repo: Repository,
    key: String,
    state: Mutex<Checkpoint>,
    dirty: AtomicBool,
}

impl Checkpointer {
    /// Writes the first checkpoint: `state` lists the files taken over
    /// from an interrupted attempt, if any.
    pub async fn start(repo: &Repository, state: Checkpoint) -> Result<Arc<Checkpointer>> {
        let c = Arc::new(Checkpointer {
            repo: repo.clone(),
            key: crate::repo::keys::checkpoint(&state.label),
            state: Mutex::new(state),
            dirty: AtomicBool::new(true),
        });
        c.save().await?;
        Ok(c)
    }

    /// Replaces the listed files with those kept from an interrupted
    /// attempt, now that they are checked against this attempt's start.
    pub fn keep(&self, files: Vec<FileEntry>, start_time: DateTime<Utc>) {
        if let Ok(mut s) = self.state.lock() {
            s.files = files;
            s.start_time = start_time;
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Records a file stored as an object of its own.
    pub fn record(&self, e: &FileEntry) {
        if e.offset.is_some() {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            s.files.push(e.clone());
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Writes the checkpoint if files finished since the last write.
    pub async fn save(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let snapshot = self.state.lock().map_err(|_| Error::Input("a backup worker failed".into()))?.clone();
        self.repo.put_metadata(&self.key, &snapshot, false).await.map(|_| ())
    }

    /// Rewrites the checkpoint every few seconds until the returned task is
    /// aborted. A failed write is retried at the next tick: the copy
    /// itself reports a store that stopped answering.
    pub fn keep_saving(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INTERVAL).await;
                if me.save().await.is_err() {
                    me.dirty.store(true, Ordering::Relaxed);
                }
            }
        })
    }

    /// Removes the checkpoint once the manifest is written.
    pub async fn remove(&self) -> Result<()> {
        self.repo.store().delete_all(vec![self.key.clone()]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, size: u64, mtime: i64, key: Option<&str>) -> FileEntry {
        FileEntry {
            checksum: "c".into(),
            key: key.map(str::to_owned),
            repo_size: 10,
            id: crate::backup::basis::test_identity(1, 1),
            ..FileEntry::for_test(path, size, mtime)
        }
    }

    fn planned(path: &str, size: u64, mtime: i64) -> PlannedFile {
        let id = crate::backup::basis::test_identity(1, 1);
        PlannedFile { path: path.into(), source: path.into(), size, mode: 0o600, mtime, basis: crate::backup::basis::Basis::Whole, id }
    }

    fn checkpoint(label: &str, kind: BackupType, prior: Option<&str>, at: DateTime<Utc>) -> Checkpoint {
        Checkpoint {
            label: BackupLabel(label.into()),
            kind,
            prior: prior.map(|p| BackupLabel(p.into())),
            compress: Compress::Zstd,
            start_time: at,
            files: vec![],
            system_id: None,
        }
    }

    #[test]
    fn keeps_only_files_provably_unchanged_since_before_the_attempt_began() {
        let began = DateTime::from_timestamp(1_000, 0).unwrap();
        let mut cp = checkpoint("L", BackupType::Full, None, began);
        cp.files = vec![
            entry("old", 100, 998, Some("k/old")),
            entry("grown", 100, 998, Some("k/grown")),
            entry("touched", 100, 998, Some("k/touched")),
            entry("same-second", 100, 1_000, Some("k/same-second")),
            entry("object-gone", 100, 998, Some("k/object-gone")),
            entry("object-short", 100, 998, Some("k/object-short")),
            entry("removed", 100, 998, Some("k/removed")),
            entry("was-whole", 100, 998, Some("k/was-whole")),
            entry("re-created", 100, 998, Some("k/re-created")),
        ];
        let plan = vec![
            planned("old", 100, 998),
            planned("grown", 200, 998),
            planned("touched", 100, 999),
            planned("same-second", 100, 1_000),
            planned("object-gone", 100, 998),
            planned("object-short", 100, 998),
            planned("new", 100, 998),
            PlannedFile { basis: crate::backup::basis::Basis::Pages { since: crate::types::Lsn(1) }, ..planned("was-whole", 100, 998) },
            PlannedFile { id: crate::backup::basis::test_identity(1, 2), ..planned("re-created", 100, 998) },
        ];
        let stored: HashMap<String, u64> = ["k/old", "k/grown", "k/touched", "k/same-second", "k/removed", "k/was-whole", "k/re-created"]
            .iter()
            .map(|k| (k.to_string(), 10))
            .chain([("k/object-short".to_string(), 9)])
            .collect();
        let kept: Vec<String> = reusable(&cp, &plan, &stored).into_iter().map(|e| e.path).collect();
        assert_eq!(kept, vec!["old"]);

        // A file in parts is kept only with every part's object.
        let parts = |sizes: &[u64]| -> Vec<crate::repo::manifest::Part> {
            sizes
                .iter()
                .enumerate()
                .map(|(k, s)| crate::repo::manifest::Part {
                    start: k as u64 * 50,
                    size: 50,
                    key: Some(format!("k/big.part{k}")),
                    repo_size: *s,
                    checksum: "c".into(),
                    pages: 0,
                    content: None,
                })
                .collect()
        };
        cp.files = vec![FileEntry { parts: parts(&[10, 10]), ..entry("big", 100, 998, None) }];
        let mut stored: HashMap<String, u64> = [("k/big.part0".to_string(), 10), ("k/big.part1".to_string(), 10)].into();
        let plan = vec![planned("big", 100, 998)];
        assert_eq!(reusable(&cp, &plan, &stored).len(), 1);
        stored.remove("k/big.part1");
        assert!(reusable(&cp, &plan, &stored).is_empty(), "a part's object is missing");

        // An empty delta stores no object and is kept as it is.
        cp.files = vec![FileEntry { delta: true, ..entry("was-whole", 100, 998, None) }];
        let plan = vec![PlannedFile {
            basis: crate::backup::basis::Basis::Pages { since: crate::types::Lsn(1) },
            ..planned("was-whole", 100, 998)
        }];
        let kept: Vec<String> = reusable(&cp, &plan, &stored).into_iter().map(|e| e.path).collect();
        assert_eq!(kept, vec!["was-whole"]);
    }

    #[test]
    fn takes_over_only_an_attempt_of_the_same_type_prior_and_compression() {
        let t = Utc::now();
        let abandoned = vec![
            Unfinished { label: BackupLabel("A".into()), checkpoint: Some(checkpoint("A", BackupType::Full, None, t)) },
            Unfinished { label: BackupLabel("B".into()), checkpoint: Some(checkpoint("B", BackupType::Incr, Some("A"), t)) },
            Unfinished { label: BackupLabel("C".into()), checkpoint: None },
        ];
        let pick = |kind, prior: Option<&str>, compress| {
            let prior = prior.map(|p| BackupLabel(p.to_owned()));
            choose(&abandoned, kind, prior.as_ref(), compress, crate::types::SystemId(1)).map(|c| c.label.0.clone())
        };
        assert_eq!(pick(BackupType::Full, None, Compress::Zstd), Some("A".into()));
        assert_eq!(pick(BackupType::Incr, Some("A"), Compress::Zstd), Some("B".into()));
        assert_eq!(pick(BackupType::Incr, Some("X"), Compress::Zstd), None);
        assert_eq!(pick(BackupType::Diff, Some("A"), Compress::Zstd), None);
        assert_eq!(pick(BackupType::Full, None, Compress::Lz4), None);
        // An attempt of another system (before pg_upgrade) is not taken
        // over; one written before checkpoints named their system is.
        let of = |id| {
            vec![Unfinished {
                label: BackupLabel("A".into()),
                checkpoint: Some(checkpoint("A", BackupType::Full, None, t).of_system(crate::types::SystemId(id))),
            }]
        };
        assert!(choose(&of(1), BackupType::Full, None, Compress::Zstd, crate::types::SystemId(1)).is_some());
        assert!(choose(&of(2), BackupType::Full, None, Compress::Zstd, crate::types::SystemId(1)).is_none());
    }
}
