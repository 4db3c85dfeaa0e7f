//! `<stanza>/backup/<label>/partial.json`: the checkpoint a backup keeps
//! while it copies (see [`crate::backup::resume`] for how a later backup
//! takes an interrupted one over), and the query for the backups that have
//! no manifest. The entries it records are in chunks of their own,
//! `partial.<n>.json` (each a list of entries, the ones recorded since the
//! chunk before), so that a running backup writes and holds only what is
//! new; `chunks` says how many the checkpoint has. A checkpoint written
//! before chunks holds its entries in `files`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupType, FileEntry, Manifest, Repository};
use crate::codec::Compress;
use crate::error::Result;
use crate::types::BackupLabel;

/// Name of the checkpoint object in a backup's directory.
pub const CHECKPOINT: &str = super::keys::CHECKPOINT;
/// The state of a backup that is copying.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Checkpoint {
    /// The backup's label.
    pub label: BackupLabel,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The backup it builds on.
    pub prior: Option<BackupLabel>,
    /// How its objects are compressed.
    pub compress: Compress,
    /// When this attempt began (before `pg_backup_start`).
    pub start_time: DateTime<Utc>,
    /// Files stored so far as objects of their own: as read back, every
    /// chunk's; as written, none (they are in the chunks).
    pub files: Vec<FileEntry>,
    /// How many chunks of entries the checkpoint has.
    #[serde(default)]
    pub chunks: u32,
    /// The system the attempt read (absent in checkpoints written before
    /// stanza-upgrade existed, when a stanza held one system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<crate::types::SystemId>,
}

/// A directory under `backup/` that has no manifest.
#[derive(Debug)]
pub struct Unfinished {
    /// Its label.
    pub label: BackupLabel,
    /// Its checkpoint, when one was written.
    pub checkpoint: Option<Checkpoint>,
}

impl Checkpoint {
    /// The checkpoint of an attempt that began at `start_time`.
    pub fn new(
        label: BackupLabel,
        kind: BackupType,
        prior: Option<BackupLabel>,
        compress: Compress,
        start_time: DateTime<Utc>,
        files: Vec<FileEntry>,
    ) -> Checkpoint {
        Checkpoint { label, kind, prior, compress, start_time, files, chunks: 0, system_id: None }
    }

    /// This checkpoint, recording that the attempt reads system `id`.
    pub fn of_system(self, id: crate::types::SystemId) -> Checkpoint {
        Checkpoint { system_id: Some(id), ..self }
    }
}

/// The unfinished backups of the repository: abandoned ones, as the caller
/// holds the stanza lock that every running backup holds.
pub async fn unfinished(repo: &Repository, complete: &[Manifest]) -> Result<Vec<Unfinished>> {
    let mut out = Vec::new();
    let mut labels = repo.store().list_dirs(super::keys::BACKUP_DIR).await?;
    labels.sort();
    for label in labels.into_iter().map(BackupLabel) {
        if complete.iter().any(|m| m.label == label) {
            continue;
        }
        let key = super::keys::checkpoint(&label);
        let what = format!("checkpoint of unfinished backup {label} in repo {}", repo.number);
        // A damaged checkpoint only means nothing can be resumed; a damaged
        // chunk, that the entries from it on are not.
        let mut checkpoint: Option<Checkpoint> = repo.get_metadata(&key, &what).await.unwrap_or(None);
        if let Some(c) = checkpoint.as_mut() {
            for n in 0..c.chunks {
                let chunk: Option<Vec<FileEntry>> =
                    repo.get_metadata(&super::keys::checkpoint_chunk(&label, n), &what).await.unwrap_or(None);
                let Some(chunk) = chunk else { break };
                c.files.extend(chunk);
            }
        }
        out.push(Unfinished { label, checkpoint });
    }
    Ok(out)
}
