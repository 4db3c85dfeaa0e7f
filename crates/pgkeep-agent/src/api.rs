//! The agent's HTTP API, version 1: the types on the wire, shared by the
//! server ([`crate::server`]) and the operator's client ([`crate::client`]).
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `GET /healthz` | none | 200 while the process serves |
//! | `GET /metrics` | none | Prometheus text ([`crate::metrics`]) |
//! | `GET /v1/status` | token | [`AgentStatus`]: the server's role and position, archiving |
//! | `GET /v1/info` | token | the engine's `info` of the stanza (JSON, as `pgkeep info --output json` prints one stanza) |
//! | `POST /v1/stanza` | token | `stanza-create` in every repository, from the primary (idempotent; refuses a repository of another cluster): [`StanzaCreated`] |
//! | `POST /v1/backups` | token | start [`BackupRequest`]; answers [`JobStatus`]; the same `id` again answers the same job |
//! | `GET /v1/backups/{id}` | token | [`JobStatus`]; 404 when this process does not know `id` |
//! | `DELETE /v1/repository/backups/{label}` | token | `expire --set LABEL` in every repository holding it (refused when other backups depend on it): [`Expired`] |
//! | `DELETE /v1/backups/{id}` | token | cancel a running job (the engine's kill -9 path: the repository keeps an unfinished backup that the next one resumes or removes) |
//!
//! The token is a bearer token (`Authorization: Bearer ...`), compared in
//! constant time. Errors are [`ApiError`] with an HTTP status: 400 bad
//! request, 401 no or wrong token, 404 unknown job, 409 another job runs,
//! 500 the engine failed.

use serde::{Deserialize, Serialize};

/// The server's role.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not in recovery.
    Primary,
    /// In recovery.
    Standby,
}

/// What an agent sees of its server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The stanza the agent serves.
    pub stanza: String,
    /// The server's role.
    pub role: Role,
    /// System identifier.
    pub system_id: String,
    /// `server_version_num`.
    pub pg_version: u32,
    /// Primary: the current WAL insert position; standby: the last replayed.
    pub lsn: String,
    /// Standby: whether its WAL receiver streams from a primary.
    pub streaming: bool,
    /// Archiving as `pg_stat_archiver` reports it (primary; a standby's own
    /// archiver is usually off).
    pub archive: ArchiverStats,
    /// The id of the job running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
}

/// `pg_stat_archiver`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ArchiverStats {
    /// Segments archived since the statistics were reset.
    pub archived_count: i64,
    /// The last segment archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_time: Option<String>,
    /// Failed attempts.
    pub failed_count: i64,
    /// The last segment that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_wal: Option<String>,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_time: Option<String>,
}

/// Where a backup on a standby reaches the primary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrimaryAddress {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Start a backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRequest {
    /// The caller's id of this run (the operator sends the Backup's uid):
    /// the same id again is the same job, so a retried request never
    /// starts a second backup.
    pub id: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository number (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<u32>,
    /// Set when this agent's server is a standby: the primary, which the
    /// backup asks to switch WAL and measures the standby's lag against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<PrimaryAddress>,
}

/// A job's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Running.
    Running,
    /// The backup is stored.
    Completed,
    /// It failed (or was cancelled).
    Failed,
}

/// A backup job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// The caller's id.
    pub id: String,
    /// Running, completed or failed.
    pub state: JobState,
    /// The role of the server read.
    pub role: Role,
    /// When the job started (RFC 3339).
    pub started_at: String,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<String>,
    /// Bytes read so far and planned (0 until planned).
    pub done_bytes: u64,
    /// Bytes planned.
    pub total_bytes: u64,
    /// The stored backup, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupResult>,
    /// Why it failed: one line, what is wrong and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a completed backup stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupResult {
    /// The engine's label.
    pub label: String,
    /// What was taken.
    #[serde(rename = "type")]
    pub kind: String,
    /// Start of the backup (RFC 3339).
    pub start_time: String,
    /// End (RFC 3339).
    pub stop_time: String,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// WAL segment of the start.
    pub start_wal: String,
    /// WAL segment of the stop.
    pub stop_wal: String,
    /// Bytes of database.
    pub size: u64,
    /// Bytes stored.
    pub repo_size: u64,
    /// Why the engine took another type than asked (an `incr` with no
    /// full backup to build on, or whose prior read another server, is a
    /// full backup), or read the primary when a standby was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// A warning: retention failed after the backup (it stands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// What `POST /v1/stanza` did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StanzaCreated {
    /// The system the repositories now hold.
    pub system_id: String,
    /// Per repository (number): whether it was created now (false: it
    /// already held this cluster).
    pub repos: Vec<(usize, bool)>,
}

/// What `DELETE /v1/repository/backups/{label}` removed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Expired {
    /// Per repository (number): the labels removed.
    pub repos: Vec<(usize, Vec<String>)>,
}

/// An error answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// What is wrong and what to do, one line.
    pub error: String,
    /// Whether trying again later can help.
    pub retryable: bool,
}
