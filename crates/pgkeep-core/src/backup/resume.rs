//! Resuming a backup that was interrupted (killed, or its machine lost).
//!
//! While a backup copies, it keeps a checkpoint, `partial.json` in its
//! directory: its type, prior and compression, when it started, and the
//! entries of the files already stored as objects of their own, and of
//! big files found unchanged (bundled small files are cheap to copy again
//! and are not listed), in chunks of what is new (see
//! [`crate::repo::partial`]). The checkpoint
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
/// Entries recorded that make the checkpoint written before its interval.
const CHUNK: usize = 4096;

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
    /// identity, size, mtime and (where both record it) ctime as
    /// recorded, that mtime a whole second before the interrupted attempt
    /// began, the same kind of copy (whole or delta), and its objects
    /// still stored with their recorded sizes.
    pub fn take(&mut self, f: &PlannedFile) -> Option<FileEntry> {
        let e = self.by_path.get(&f.path)?;
        let unchanged = f.same_file_as(e) && e.size == f.size && e.mtime == f.mtime && f.ctime_unmoved(e) && e.mtime + 1 < self.began;
        let same_kind = e.delta == f.delta() && e.offset.is_none();
        let object_there = e.own_objects().iter().all(|(key, size)| self.stored.get(*key) == Some(size));
        match unchanged && same_kind && object_there {
            true => self.by_path.remove(&f.path),
            false => None,
        }
    }
}

/// Keeps the checkpoint of a running backup up to date: the entries
/// recorded since the last write go to a new chunk, then the checkpoint
/// counts it; only those entries are held in memory.
pub struct Checkpointer {
    repo: Repository,
    key: String,
    state: Mutex<State>,
    dirty: AtomicBool,
    /// Woken when a chunk's worth of entries waits.
    full: tokio::sync::Notify,
}

/// The checkpoint as last written (without entries), the entries recorded
/// since, and the most chunks written (for [`Checkpointer::remove`]).
struct State {
    header: Checkpoint,
    pending: Vec<FileEntry>,
    written: u32,
}

impl Checkpointer {
    /// Writes the first checkpoint: `state` lists the files taken over
    /// from an interrupted attempt, if any.
    /// Its `chunks` are those an interrupted attempt wrote (removed with
    /// this attempt's at the end).
    pub async fn start(repo: &Repository, mut state: Checkpoint) -> Result<Arc<Checkpointer>> {
        let pending = std::mem::take(&mut state.files);
        let written = std::mem::take(&mut state.chunks);
        let c = Arc::new(Checkpointer {
            repo: repo.clone(),
            key: crate::repo::keys::checkpoint(&state.label),
            state: Mutex::new(State { header: state, pending, written }),
            dirty: AtomicBool::new(true),
            full: tokio::sync::Notify::new(),
        });
        c.save().await?;
        Ok(c)
    }

    /// Replaces the listed files with those kept from an interrupted
    /// attempt, now that they are checked against this attempt's start.
    pub fn keep(&self, files: Vec<FileEntry>, start_time: DateTime<Utc>) {
        if let Ok(mut s) = self.state.lock() {
            s.header.chunks = 0;
            s.header.start_time = start_time;
            s.pending = files;
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Records a file stored as an object of its own, or a delta of no
    /// page of a file too big to bundle (read again, it would cost a read
    /// of the whole file); a bundled file, or a small one that stored
    /// nothing, is cheap to copy again. Once [`CHUNK`] entries wait, the
    /// saver is woken.
    pub fn record(&self, e: &FileEntry) {
        if e.offset.is_some() || (e.own_objects().is_empty() && e.size < super::bundle::SMALL_FILE) {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            s.pending.push(e.clone());
            self.dirty.store(true, Ordering::Relaxed);
            if s.pending.len() >= CHUNK {
                self.full.notify_one();
            }
        }
    }

    /// Writes what was recorded since the last write, if anything: a new
    /// chunk, then the checkpoint that counts it. A write that fails keeps
    /// the entries for the next.
    pub async fn save(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let failed = || Error::Input("a backup worker failed".into());
        let (mut header, entries) = {
            let mut s = self.state.lock().map_err(|_| failed())?;
            (s.header.clone(), std::mem::take(&mut s.pending))
        };
        let chunk = header.chunks;
        let written = async {
            if !entries.is_empty() {
                let key = crate::repo::keys::checkpoint_chunk(&header.label, chunk);
                self.repo.put_metadata(&key, &entries, false).await?;
                header.chunks += 1;
            }
            self.repo.put_metadata(&self.key, &header, false).await
        }
        .await;
        let mut s = self.state.lock().map_err(|_| failed())?;
        match written {
            // `keep` may have started the chunks again meanwhile.
            Ok(_) if s.header.chunks == chunk && s.header.start_time == header.start_time => {
                s.written = s.written.max(header.chunks);
                s.header.chunks = header.chunks;
                Ok(())
            }
            Ok(_) => {
                s.written = s.written.max(header.chunks);
                Ok(())
            }
            Err(e) => {
                // Unless `keep` replaced them meanwhile.
                if s.header.start_time == header.start_time {
                    let later = std::mem::replace(&mut s.pending, entries);
                    s.pending.extend(later);
                }
                self.dirty.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Rewrites the checkpoint every few seconds (sooner when a chunk's
    /// worth of entries waits) until the returned task is aborted. A failed write is retried at the next tick: the copy
    /// itself reports a store that stopped answering.
    pub fn keep_saving(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(INTERVAL) => {}
                    _ = me.full.notified() => {}
                }
                let _ = me.save().await;
            }
        })
    }

    /// Removes the checkpoint and its chunks once the manifest is written.
    pub async fn remove(&self) -> Result<()> {
        let (label, written) = match self.state.lock() {
            Ok(s) => (s.header.label.clone(), s.written),
            Err(_) => return Ok(()),
        };
        let mut keys = vec![self.key.clone()];
        keys.extend((0..written).map(|n| crate::repo::keys::checkpoint_chunk(&label, n)));
        self.repo.store().delete_all(keys).await
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
        PlannedFile {
            path: path.into(),
            source: path.into(),
            size,
            mode: 0o600,
            mtime,
            ctime: None,
            basis: crate::backup::basis::Basis::Whole,
            id,
        }
    }

    fn checkpoint(label: &str, kind: BackupType, prior: Option<&str>, at: DateTime<Utc>) -> Checkpoint {
        Checkpoint {
            label: BackupLabel(label.into()),
            kind,
            prior: prior.map(|p| BackupLabel(p.into())),
            compress: Compress::Zstd,
            start_time: at,
            files: vec![],
            chunks: 0,
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
            entry("second-before", 100, 999, Some("k/second-before")),
            FileEntry { ctime: Some(5), ..entry("ctime-moved", 100, 998, Some("k/ctime-moved")) },
            FileEntry { ctime: Some(5), ..entry("ctime-same", 100, 998, Some("k/ctime-same")) },
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
            planned("second-before", 100, 999),
            PlannedFile { ctime: Some(6), ..planned("ctime-moved", 100, 998) },
            PlannedFile { ctime: Some(5), ..planned("ctime-same", 100, 998) },
            planned("object-gone", 100, 998),
            planned("object-short", 100, 998),
            planned("new", 100, 998),
            PlannedFile { basis: crate::backup::basis::Basis::Pages { since: crate::types::Lsn(1) }, ..planned("was-whole", 100, 998) },
            PlannedFile { id: crate::backup::basis::test_identity(1, 2), ..planned("re-created", 100, 998) },
        ];
        let stored: HashMap<String, u64> = [
            "k/old",
            "k/grown",
            "k/touched",
            "k/same-second",
            "k/second-before",
            "k/ctime-moved",
            "k/ctime-same",
            "k/removed",
            "k/was-whole",
            "k/re-created",
        ]
        .iter()
        .map(|k| (k.to_string(), 10))
        .chain([("k/object-short".to_string(), 9)])
        .collect();
        let kept: Vec<String> = reusable(&cp, &plan, &stored).into_iter().map(|e| e.path).collect();
        assert_eq!(kept, vec!["old", "ctime-same"]);

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

    /// The checkpoint writes only what is new, in chunks; reading it back
    /// gives every entry recorded; a chunk that cannot be written keeps
    /// its entries for the next write; the end removes every chunk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_is_written_in_chunks_of_what_is_new() {
        use crate::storage::testing::{Fault, Faulty, Op, Rule};
        let faulty = Faulty::new(std::sync::Arc::new(object_store::memory::InMemory::new()));
        let store = crate::storage::Store::from_object_store(faulty.clone(), "memory://");
        let (repo, _) = Repository::create(&store, crate::repo::StanzaMeta::for_test(7), 1, None).await.unwrap();
        let t = Utc::now();
        let mut first = checkpoint("L", BackupType::Full, None, t);
        first.files = vec![entry("a", 1, 0, Some("k/a"))];
        let c = Checkpointer::start(&repo, first).await.unwrap();
        let read = || async { crate::repo::partial::unfinished(&repo, &[]).await.unwrap().remove(0).checkpoint.unwrap() };
        let paths = |cp: &Checkpoint| cp.files.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!((paths(&read().await), read().await.chunks), (vec!["a".to_owned()], 1));
        c.record(&entry("b", 1, 0, Some("k/b")));
        c.record(&entry("c", 1, 0, Some("k/c")));
        faulty.set(vec![Rule::new(Op::Put, "partial.1.json", Fault::Fail)]);
        assert!(c.save().await.is_err());
        assert_eq!(read().await.chunks, 1, "the checkpoint counts only chunks written");
        faulty.clear();
        c.record(&entry("d", 1, 0, Some("k/d")));
        c.save().await.unwrap();
        let cp = read().await;
        assert_eq!((paths(&cp), cp.chunks), (vec!["a".to_owned(), "b".into(), "c".into(), "d".into()], 2));
        c.save().await.unwrap();
        assert_eq!(read().await.chunks, 2, "nothing new, no chunk");
        c.remove().await.unwrap();
        let left = repo.store().list(&Repository::backup_dir(&BackupLabel("L".into()))).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
