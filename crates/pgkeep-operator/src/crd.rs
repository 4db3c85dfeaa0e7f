//! The custom resources of API group `pgkeep.dev`, version `v1alpha1`:
//! [`Stanza`] (one PostgreSQL cluster under protection and its
//! repositories), [`Backup`] (one on-demand backup) and
//! [`ScheduledBackup`] (backups on a cron schedule). Field names follow
//! CloudNativePG's where the idea is the same (`destinationPath`,
//! `endpointURL`, `s3Credentials`, `backupOwnerReference`, `immediate`,
//! `suspend`, `lastScheduleTime`, `firstRecoverabilityPoint`), so that its
//! users read them without a guide. The CRDs in `deploy/crds/` are
//! generated from these types (`cargo run -p pgkeep-operator --bin crdgen`);
//! a test fails when they differ.

// kube's `printcolumn(...)` is repeated once per column, by design: not a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "pgkeep.dev";

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeySelector {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// A Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the Secret.
    pub name: String,
}

/// Where backups are taken from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackupTarget {
    /// The streaming standby whose replay is the most recent, falling back
    /// to the primary when none streams.
    #[default]
    PreferStandby,
    /// Always the primary.
    Primary,
}

/// The kind of a backup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Every file.
    Full,
    /// The pages changed since the last full backup.
    Diff,
    /// The pages changed since the last backup of any type (full when
    /// there is none).
    #[default]
    Incr,
}

impl BackupType {
    /// The engine's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        }
    }
}

// ---------------------------------------------------------------- Stanza

/// One PostgreSQL cluster under protection: which pods run it, where its
/// backups and WAL go, and how long they are kept.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pgkeep.dev",
    version = "v1alpha1",
    kind = "Stanza",
    namespaced,
    status = "StanzaStatus",
    shortname = "stz",
    category = "pgkeep",
    doc = "One PostgreSQL cluster protected by pgkeep, with its repositories and retention.",
    printcolumn(name = "First recoverable", type_ = "string", json_path = ".status.firstRecoverabilityPoint"),
    printcolumn(name = "Last backup", type_ = "string", json_path = ".status.lastSuccessfulBackup"),
    printcolumn(name = "Last WAL", type_ = "string", json_path = ".status.archive.lastArchivedWal"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct StanzaSpec {
    /// The pods of the cluster (primary and standbys), e.g. `app=postgres`.
    pub selector: LabelSelector,
    /// The PostgreSQL container in those pods (default `postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The data directory inside the pods (default `/var/lib/postgresql/data`,
    /// the official image's PGDATA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_data: Option<String>,
    /// PostgreSQL's port (default 5432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_port: Option<u16>,
    /// A Secret whose key `password` is the password of PostgreSQL's
    /// `postgres` user, which a backup on a standby uses to reach the
    /// primary over the network (the injection webhook sets `PGPASSWORD`
    /// from it). Not needed when the primary trusts the pod network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<LocalObjectReference>,
    /// The repositories, in order: the first is repository 1.
    #[schemars(length(min = 1))]
    pub repositories: Vec<RepositorySpec>,
    /// Compression of stored objects: `zstd` (default), `lz4`, `gzip` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// A Secret key holding the passphrase that encrypts the repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<SecretKeySelector>,
    /// How long backups and WAL are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// Default target of this stanza's backups (default `prefer-standby`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BackupTarget>,
    /// The in-pod agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,
}

/// A compression codec.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd.
    Zstd,
    /// lz4.
    Lz4,
    /// gzip.
    Gzip,
    /// None.
    None,
}

/// One repository. `destinationPath` says which kind: a directory (a
/// volume mounted at that path in every pod of the cluster, shared, e.g. a
/// ReadWriteMany claim), `s3://bucket/prefix`, `gs://bucket/prefix` or
/// `az://container/prefix`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    /// Where: a directory, `s3://`, `gs://` or `az://`.
    #[schemars(length(min = 1))]
    pub destination_path: String,
    /// The object store's endpoint (S3-compatible servers, Azure emulators).
    #[serde(default, rename = "endpointURL", skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// S3: the region (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// S3: path-style requests (most S3-compatible servers need them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// S3 credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_credentials: Option<S3Credentials>,
    /// Azure credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_credentials: Option<AzureCredentials>,
    /// Google Cloud Storage credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub google_credentials: Option<GoogleCredentials>,
}

/// S3 access keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    /// The access key id.
    pub access_key_id: SecretKeySelector,
    /// The secret access key.
    pub secret_access_key: SecretKeySelector,
}

/// Azure storage account and key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureCredentials {
    /// The storage account.
    pub storage_account: SecretKeySelector,
    /// The storage account's key.
    pub storage_key: SecretKeySelector,
}

/// A Google service account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoogleCredentials {
    /// The service account's JSON key.
    pub application_credentials: SecretKeySelector,
}

/// Retention, applied after every backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Full backups to keep, with the backups that depend on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_backups: Option<u32>,
    /// Differential backups to keep, with their incrementals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_backups: Option<u32>,
    /// Keep every point of this window recoverable: `30d`, `12h`, `2w`
    /// (CloudNativePG's `retentionPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_window: Option<String>,
}

/// How the operator reaches the agents.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The agent's port in each pod (default 8432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The Secret whose key `token` the agents require of the operator
    /// (default `<stanza>-agent`, created by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
}

/// What the operator last saw of a stanza.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StanzaStatus {
    /// The earliest point a restore can reach (the end of the oldest
    /// backup, where it is consistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverability_point: Option<String>,
    /// The latest point a restore can reach (the end of the last archived WAL
    /// segment, or of the last backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recoverability_point: Option<String>,
    /// When the last successful backup ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    /// When the last failed backup failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_backup: Option<String>,
    /// WAL archiving, as the primary reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
    /// The backups the repositories hold, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<BackupSummary>,
    /// The cluster's system identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// The system the operator created the stanza for in every
    /// repository (`stanza-create`, from the primary's agent). Backups
    /// wait until it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_for_system: Option<String>,
    /// Conditions: `Ready` (the agents answer and the stanza exists in the
    /// repositories), `Archiving` (WAL reaches the archive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// WAL archiving health.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveStatus {
    /// The last segment archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_time: Option<String>,
    /// Failed attempts since the server's statistics were reset.
    #[serde(default)]
    pub failed_count: i64,
    /// The last segment that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_wal: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_time: Option<String>,
    /// Seconds from the last archived segment to when this was observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_since_last_archived: Option<i64>,
}

/// One backup held by the repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSummary {
    /// The engine's label.
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The label of the backup it depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<String>,
    /// When it started (RFC 3339).
    pub start_time: String,
    /// When it ended (RFC 3339).
    pub stop_time: String,
    /// Bytes of database.
    pub size: u64,
    /// Bytes stored for it.
    pub repo_size: u64,
}

// ---------------------------------------------------------------- Backup

/// One backup, taken once.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgkeep.dev",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    shortname = "pkbackup",
    status = "BackupStatus",
    category = "pgkeep",
    doc = "One on-demand backup of a Stanza.",
    printcolumn(name = "Stanza", type_ = "string", json_path = ".spec.stanza"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Label", type_ = "string", json_path = ".status.label"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.pod"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Backup's spec cannot change: create another Backup"))]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// The Stanza (same namespace).
    #[x_kube(validation = Rule::new("self != ''").message("stanza must name a Stanza"))]
    pub stanza: String,
    /// `full`, `diff` or `incr` (default `incr`: full when there is none).
    #[serde(default, rename = "type")]
    pub kind: BackupType,
    /// Where to take it (default: the Stanza's `target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BackupTarget>,
    /// The repository, by number (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<u32>,
    /// When this Backup is deleted after it completed, delete its data
    /// from the repository too (`expire --set`; refused, and the data
    /// kept, when later backups depend on it). Default false: the data
    /// stays, and the Stanza's retention decides.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_from_repository: bool,
}

/// A Backup's phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not started.
    #[default]
    Pending,
    /// An agent runs it.
    Running,
    /// Stored; `label` names it in the repository.
    Completed,
    /// Failed; `error` says why. Never retried: create another Backup.
    Failed,
}

impl Phase {
    /// Completed or failed.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
}

/// What happened to a Backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// `pending`, `running`, `completed` or `failed`.
    #[serde(default)]
    pub phase: Phase,
    /// The engine's backup label, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `full`, `diff` or `incr`: what was taken (an `incr` with no prior
    /// backup is a `full`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The pod it runs or ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `primary` or `standby`: the role of that pod's server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The agent's id of the run (the Backup's uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<String>,
    /// First LSN a restore of it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_lsn: Option<String>,
    /// LSN where it is consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// WAL segment holding `beginLsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_wal: Option<String>,
    /// WAL segment holding `endLsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_wal: Option<String>,
    /// Bytes of database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Bytes stored for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_size: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the operator last heard the agent running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
}

// ------------------------------------------------------- ScheduledBackup

/// Backups on a cron schedule.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pgkeep.dev",
    version = "v1alpha1",
    kind = "ScheduledBackup",
    namespaced,
    shortname = "pkschedule",
    status = "ScheduledBackupStatus",
    category = "pgkeep",
    doc = "Backups of a Stanza on a cron schedule.",
    printcolumn(name = "Stanza", type_ = "string", json_path = ".spec.stanza"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Last", type_ = "string", json_path = ".status.lastScheduleTime"),
    printcolumn(name = "Next", type_ = "string", json_path = ".status.nextScheduleTime")
)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBackupSpec {
    /// The Stanza (same namespace).
    pub stanza: String,
    /// Cron, in UTC unless `timezone` says otherwise: six fields with seconds first (`0 0 2 * * *`, as
    /// CloudNativePG), or the classic five (`0 2 * * *`).
    pub schedule: String,
    /// The IANA time zone of the schedule (default UTC), e.g.
    /// `Europe/Paris`; across daylight-saving jumps each local time runs
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// `full`, `diff` or `incr` (default `incr`).
    #[serde(default, rename = "type")]
    pub kind: BackupType,
    /// Where to take them (default: the Stanza's `target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BackupTarget>,
    /// Take one backup as soon as this resource is created.
    #[serde(default)]
    pub immediate: bool,
    /// Make no backups while true.
    #[serde(default)]
    pub suspend: bool,
    /// Who owns the Backups made: `none` (they outlive this resource),
    /// `self` (deleted with it, the default) or `stanza`.
    #[serde(default)]
    pub backup_owner_reference: OwnerReferenceKind,
}

/// The owner of the Backups a ScheduledBackup makes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OwnerReferenceKind {
    /// No owner.
    None,
    /// The ScheduledBackup.
    #[default]
    #[serde(rename = "self")]
    Itself,
    /// The Stanza.
    Stanza,
}

/// What a ScheduledBackup did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBackupStatus {
    /// The tick of the last Backup made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The next tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// The last tick skipped because a backup of the stanza was running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped_time: Option<String>,
    /// Why the last attempt to make a Backup failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The CRDs as YAML documents, with their file names in `deploy/crds/`.
pub fn yaml() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let header = "# Generated by `cargo run -p pgkeep-operator --bin crdgen deploy/crds`: do not edit.\n";
    let doc = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let mut v = serde_json::to_value(&crd).expect("a CRD encodes");
        strip_unsigned_formats(&mut v);
        format!("{header}{}", serde_yaml::to_string(&v).expect("a CRD encodes as YAML"))
    };
    vec![
        ("stanzas.pgkeep.dev.yaml", doc(Stanza::crd())),
        ("backups.pgkeep.dev.yaml", doc(Backup::crd())),
        ("scheduledbackups.pgkeep.dev.yaml", doc(ScheduledBackup::crd())),
    ]
}

/// Removes the `format: uint16/32/64` that schemars writes for unsigned
/// integers: the API server knows no such OpenAPI format and warns on every
/// apply (`minimum: 0` stays, and says the same).
fn strip_unsigned_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("format").and_then(|f| f.as_str()).is_some_and(|f| f.starts_with("uint")) {
                map.remove("format");
            }
            map.values_mut().for_each(strip_unsigned_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_unsigned_formats),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_crds_are_the_generated_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
        for (file, text) in super::yaml() {
            let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(
                committed == text,
                "deploy/crds/{file} differs from the Rust types: run `cargo run -p pgkeep-operator --bin crdgen deploy/crds` and commit"
            );
        }
    }
}
