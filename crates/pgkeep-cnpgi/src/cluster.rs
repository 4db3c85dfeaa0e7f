//! The parts of CloudNativePG's `Cluster` and `Backup` (they reach a plugin
//! as JSON bytes) that pgkeep reads, which stanza a request is about, and
//! the plugin's parameters, checked with the field path of each mistake.
//!
//! Field names are CloudNativePG's (`api/v1/cluster_types.go`,
//! `backup_types.go`); unknown fields are ignored, as a newer
//! CloudNativePG may add some.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::PLUGIN_NAME;

/// A CloudNativePG `Cluster`, as much of it as the plugin reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Cluster {
    /// Name and namespace.
    pub metadata: Metadata,
    /// The spec.
    pub spec: ClusterSpec,
    /// The status.
    pub status: ClusterStatus,
}

/// `metadata`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Metadata {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

/// `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterSpec {
    /// `spec.plugins`.
    pub plugins: Vec<PluginConfiguration>,
    /// `spec.externalClusters`.
    pub external_clusters: Vec<ExternalCluster>,
    /// `spec.bootstrap`.
    pub bootstrap: Option<Bootstrap>,
    /// `spec.replica`.
    pub replica: Option<ReplicaCluster>,
    /// `spec.postgresql`.
    pub postgresql: Option<PostgresConfiguration>,
    /// `spec.walStorage`: WAL on a volume of its own (only its presence
    /// matters here).
    pub wal_storage: Option<serde_json::Value>,
}

/// `spec.postgresql`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PostgresConfiguration {
    /// `spec.postgresql.parameters`.
    pub parameters: BTreeMap<String, String>,
}

/// `spec.plugins[]`, or an external cluster's `plugin`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PluginConfiguration {
    /// The plugin's name (`pgkeep.dev`).
    pub name: String,
    /// Absent means enabled.
    pub enabled: Option<bool>,
    /// Whether this plugin archives the cluster's WAL.
    #[serde(rename = "isWALArchiver")]
    pub is_wal_archiver: Option<bool>,
    /// Free-form parameters, checked by [`validate`].
    pub parameters: BTreeMap<String, String>,
}

impl PluginConfiguration {
    fn is_ours(&self) -> bool {
        self.name == PLUGIN_NAME && self.enabled != Some(false)
    }
}

/// `spec.externalClusters[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExternalCluster {
    /// Its name, referred to by `bootstrap.recovery.source`.
    pub name: String,
    /// The plugin that serves it.
    pub plugin: Option<PluginConfiguration>,
}

/// `spec.bootstrap`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Bootstrap {
    /// `spec.bootstrap.recovery`.
    pub recovery: Option<Recovery>,
}

/// `spec.bootstrap.recovery`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Recovery {
    /// The external cluster to recover from.
    pub source: String,
    /// Where recovery stops.
    pub recovery_target: Option<RecoveryTarget>,
}

/// `spec.bootstrap.recovery.recoveryTarget`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RecoveryTarget {
    /// A backup to restore, by its id (pgkeep's backup label).
    #[serde(rename = "backupID")]
    pub backup_id: String,
    /// `recovery_target_timeline`: `latest`, `current` or a number.
    #[serde(rename = "targetTLI")]
    pub target_tli: String,
    /// `recovery_target_xid`.
    #[serde(rename = "targetXID")]
    pub target_xid: String,
    /// `recovery_target_name`.
    pub target_name: String,
    /// `recovery_target_lsn`.
    #[serde(rename = "targetLSN")]
    pub target_lsn: String,
    /// `recovery_target_time`.
    pub target_time: String,
    /// `recovery_target = 'immediate'`.
    pub target_immediate: Option<bool>,
    /// Stop just before the target.
    pub exclusive: Option<bool>,
}

/// `spec.replica`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReplicaCluster {
    /// Whether the cluster is a replica cluster.
    pub enabled: Option<bool>,
    /// The external cluster it follows.
    pub source: String,
}

/// `status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterStatus {
    /// The instance that is primary; empty while the cluster is being
    /// bootstrapped (a recovery Job runs before any primary exists).
    pub current_primary: String,
}

/// A CloudNativePG `Backup`, as much of it as the plugin reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Backup {
    /// Name and namespace.
    pub metadata: Metadata,
    /// The spec.
    pub spec: BackupSpec,
}

/// A `Backup`'s spec.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BackupSpec {
    /// `plugin` for us.
    pub method: String,
    /// `primary` or `prefer-standby` (CloudNativePG picks the instance).
    pub target: String,
    /// `spec.pluginConfiguration`.
    pub plugin_configuration: Option<PluginConfiguration>,
}

/// A mistake in a parameter, with the path of the field, as CNPG-I's
/// `ValidationError` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The field, one component each (`spec`, `plugins[0]`, `parameters`,
    /// `stanza`).
    pub path: Vec<String>,
    /// The value that is wrong (empty when missing).
    pub value: String,
    /// What is wrong, in one line.
    pub message: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.join("."), self.message)
    }
}

/// What a request needs the stanza for, which decides where it is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Archive, Backup, Status, SetFirstRequired: the cluster's own
    /// stanza (`spec.plugins[pgkeep.dev].parameters.stanza`).
    Own,
    /// WAL Restore: the recovery source's stanza while the cluster is
    /// being bootstrapped (no primary yet), the cluster's own otherwise
    /// (a standby catching up from the archive).
    RestoreWal,
    /// The recovery Job: the recovery source's stanza.
    Recovery,
}

/// Which stanza, and what the parameters say beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StanzaRef {
    /// The stanza's name in the agent's config file.
    pub stanza: String,
    /// For a recovery: the backup the parameters name (`backup`), if any.
    pub backup: Option<String>,
    /// Where the parameters were read (`spec.plugins[0].parameters`), for
    /// messages.
    pub path: String,
}

/// The keys of `spec.plugins[pgkeep.dev].parameters`.
pub const CLUSTER_KEYS: &[&str] = &["stanza"];
/// The keys of an external cluster's `plugin.parameters`.
pub const RECOVERY_KEYS: &[&str] = &["stanza", "backup"];
/// The keys of a `Backup`'s or `ScheduledBackup`'s
/// `pluginConfiguration.parameters`.
pub const BACKUP_KEYS: &[&str] = &["type"];

impl Cluster {
    /// Reads a `Cluster` from the JSON CloudNativePG sends.
    pub fn from_json(bytes: &[u8]) -> Result<Cluster, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the Cluster definition is not a CloudNativePG Cluster: {e}"))
    }

    /// `spec.plugins[]` entry of pgkeep, enabled, with its index.
    pub fn own_plugin(&self) -> Option<(usize, &PluginConfiguration)> {
        self.spec.plugins.iter().enumerate().find(|(_, p)| p.is_ours())
    }

    /// The external cluster the cluster recovers from, when pgkeep serves
    /// it, with its index.
    pub fn recovery_plugin(&self) -> Option<(usize, &PluginConfiguration)> {
        let source = &self.spec.bootstrap.as_ref()?.recovery.as_ref()?.source;
        self.external_plugin(source)
    }

    fn external_plugin(&self, name: &str) -> Option<(usize, &PluginConfiguration)> {
        self.spec
            .external_clusters
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
            .and_then(|(i, c)| c.plugin.as_ref().filter(|p| p.is_ours()).map(|p| (i, p)))
    }

    /// Whether pgkeep is the cluster's WAL archiver. CloudNativePG calls
    /// Archive on every enabled plugin that can archive, whatever this
    /// says; the plugin then archives only when it is.
    pub fn archives_wal(&self) -> bool {
        self.own_plugin().is_some_and(|(_, p)| p.is_wal_archiver == Some(true))
    }

    /// Whether pgkeep serves this cluster's WAL restores now: while it is
    /// bootstrapped, when pgkeep is its recovery source; once running,
    /// when pgkeep archives its WAL. CloudNativePG asks every plugin in
    /// turn, so a plugin that is not the source must say "not found" at
    /// once.
    pub fn serves_wal_restore(&self) -> bool {
        if self.status.current_primary.is_empty() && self.recovery_plugin().is_some() {
            return true;
        }
        !self.status.current_primary.is_empty() && self.archives_wal()
    }

    /// The primary's `archive_timeout` in seconds: CloudNativePG's
    /// default is 5 minutes; `None` when it is 0 (off) or unreadable.
    pub fn archive_timeout_secs(&self) -> Option<u64> {
        let text = self.spec.postgresql.as_ref().and_then(|p| p.parameters.get("archive_timeout")).map(String::as_str).unwrap_or("5min");
        parse_pg_seconds(text).filter(|s| *s > 0)
    }

    /// Whether CloudNativePG's empty-archive check applies, when the
    /// request does not say (CloudNativePG before the field, 1.30.0
    /// included): not when the Cluster is annotated
    /// `cnpg.io/skipEmptyWalArchiveCheck: enabled`.
    pub fn empty_archive_check_enabled(&self) -> bool {
        self.metadata.annotations.get("cnpg.io/skipEmptyWalArchiveCheck").map(String::as_str) != Some("enabled")
    }

    /// The recovery target, if any.
    pub fn recovery_target(&self) -> Option<&RecoveryTarget> {
        self.spec.bootstrap.as_ref()?.recovery.as_ref()?.recovery_target.as_ref()
    }

    /// The stanza a request for `purpose` is about, or why there is none.
    pub fn stanza_for(&self, purpose: Purpose) -> Result<StanzaRef, ParamError> {
        let bootstrapping = self.status.current_primary.is_empty();
        let recovery = match purpose {
            Purpose::Own => false,
            Purpose::RestoreWal => bootstrapping && self.recovery_plugin().is_some(),
            Purpose::Recovery => true,
        };
        if recovery {
            let Some((i, p)) = self.recovery_plugin() else {
                return Err(ParamError {
                    path: vec!["spec".into(), "bootstrap".into(), "recovery".into(), "source".into()],
                    value: self.spec.bootstrap.as_ref().and_then(|b| b.recovery.as_ref()).map(|r| r.source.clone()).unwrap_or_default(),
                    message: format!("names no external cluster whose plugin is {PLUGIN_NAME}"),
                });
            };
            let path = format!("spec.externalClusters[{i}].plugin.parameters");
            let stanza = stanza_param(p, &path)?;
            return Ok(StanzaRef { stanza, backup: p.parameters.get("backup").cloned(), path });
        }
        let Some((i, p)) = self.own_plugin() else {
            return Err(ParamError {
                path: vec!["spec".into(), "plugins".into()],
                value: String::new(),
                message: format!("has no enabled entry named {PLUGIN_NAME}"),
            });
        };
        let path = format!("spec.plugins[{i}].parameters");
        Ok(StanzaRef { stanza: stanza_param(p, &path)?, backup: None, path })
    }
}

/// A PostgreSQL time setting whose unit defaults to seconds ("300",
/// "5min", "30s", "1h", "1d", "500ms" rounded up), in seconds.
pub fn parse_pg_seconds(text: &str) -> Option<u64> {
    let t = text.trim().trim_matches('\'');
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits].parse().ok()?;
    let unit = t[digits..].trim();
    Some(match unit {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "min" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return None,
    })
}

fn split(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

fn stanza_param(p: &PluginConfiguration, path: &str) -> Result<String, ParamError> {
    let value = p.parameters.get("stanza").cloned().unwrap_or_default();
    let mut at = split(path);
    at.push("stanza".into());
    if value.is_empty() {
        return Err(ParamError { path: at, value, message: "is required: the name of the pgkeep Stanza".into() });
    }
    if !valid_stanza_name(&value) {
        return Err(ParamError { path: at, value, message: "may hold only letters, digits, '-', '_' and '.'".into() });
    }
    Ok(value)
}

/// A stanza name the engine accepts (the same rule as its config file),
/// that cannot be read as a flag or a path.
pub fn valid_stanza_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Every mistake in pgkeep's parameters of `cluster`: unknown keys, a
/// missing or malformed stanza, a recovery source without one.
pub fn validate(cluster: &Cluster) -> Vec<ParamError> {
    let mut errors = Vec::new();
    let mut check = |p: &PluginConfiguration, path: String, known: &[&str]| {
        for (k, v) in &p.parameters {
            if !known.contains(&k.as_str()) {
                let mut at = split(&path);
                at.push(k.clone());
                errors.push(ParamError {
                    path: at,
                    value: v.clone(),
                    message: format!("is not a parameter of {PLUGIN_NAME} (known: {})", known.join(", ")),
                });
            }
        }
        if let Err(e) = stanza_param(p, &path) {
            errors.push(e);
        }
    };
    let mut archiver = Vec::new();
    for (i, p) in cluster.spec.plugins.iter().enumerate().filter(|(_, p)| p.is_ours()) {
        check(p, format!("spec.plugins[{i}].parameters"), CLUSTER_KEYS);
        if p.is_wal_archiver != Some(true) {
            archiver.push(ParamError {
                path: split(&format!("spec.plugins[{i}].isWALArchiver")),
                value: p.is_wal_archiver.map(|b| b.to_string()).unwrap_or_default(),
                message: format!("must be true: {PLUGIN_NAME}'s backups need the cluster's WAL in its repository"),
            });
        }
    }
    for (i, c) in cluster.spec.external_clusters.iter().enumerate() {
        if let Some(p) = c.plugin.as_ref().filter(|p| p.is_ours()) {
            check(p, format!("spec.externalClusters[{i}].plugin.parameters"), RECOVERY_KEYS);
        }
    }
    errors.extend(archiver);
    errors
}

/// The type of backup a `Backup`'s parameters ask for: `full`, `diff` or
/// `incr`; `full` when not given (what CloudNativePG users expect of a
/// Backup that names no type).
pub fn backup_type(backup: &Backup) -> Result<String, ParamError> {
    let params = backup.spec.plugin_configuration.as_ref().map(|p| &p.parameters);
    let mut errors = params.into_iter().flatten().filter(|(k, _)| !BACKUP_KEYS.contains(&k.as_str())).map(|(k, v)| ParamError {
        path: split(&format!("spec.pluginConfiguration.parameters.{k}")),
        value: v.clone(),
        message: format!("is not a backup parameter of {PLUGIN_NAME} (known: {})", BACKUP_KEYS.join(", ")),
    });
    if let Some(e) = errors.next() {
        return Err(e);
    }
    match params.and_then(|p| p.get("type")).map(String::as_str) {
        None | Some("full") => Ok("full".into()),
        Some(t @ ("diff" | "incr")) => Ok(t.into()),
        Some(other) => Err(ParamError {
            path: split("spec.pluginConfiguration.parameters.type"),
            value: other.into(),
            message: "must be full, diff or incr".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(v: serde_json::Value) -> Cluster {
        Cluster::from_json(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn the_own_stanza_comes_from_spec_plugins_and_a_recovery_from_the_external_cluster() {
        let c = cluster(serde_json::json!({
            "metadata": {"name": "pg", "namespace": "db"},
            "spec": {
                "plugins": [{"name": "other"}, {"name": "pgkeep.dev", "isWALArchiver": true, "parameters": {"stanza": "new"}}],
                "externalClusters": [{"name": "origin", "plugin": {"name": "pgkeep.dev", "parameters": {"stanza": "old", "backup": "20260101-000000F"}}}],
                "bootstrap": {"recovery": {"source": "origin", "recoveryTarget": {"targetTime": "2026-01-01 00:00:00+00"}}}
            },
            "status": {}
        }));
        assert_eq!(c.stanza_for(Purpose::Own).unwrap().stanza, "new");
        let r = c.stanza_for(Purpose::Recovery).unwrap();
        assert_eq!((r.stanza.as_str(), r.backup.as_deref()), ("old", Some("20260101-000000F")));
        assert_eq!(r.path, "spec.externalClusters[0].plugin.parameters");
        // No primary yet: a WAL restore is the recovery's.
        assert_eq!(c.stanza_for(Purpose::RestoreWal).unwrap().stanza, "old");
        let mut running = c.clone();
        running.status.current_primary = "pg-1".into();
        assert_eq!(running.stanza_for(Purpose::RestoreWal).unwrap().stanza, "new");
        assert!(c.archives_wal());
        assert_eq!(c.recovery_target().unwrap().target_time, "2026-01-01 00:00:00+00");
        assert!(validate(&c).is_empty());
    }

    #[test]
    fn a_disabled_or_missing_entry_and_bad_parameters_are_named_by_their_path() {
        let c =
            cluster(serde_json::json!({"spec": {"plugins": [{"name": "pgkeep.dev", "enabled": false, "parameters": {"stanza": "x"}}]}}));
        let e = c.stanza_for(Purpose::Own).unwrap_err();
        assert_eq!(e.to_string(), "spec.plugins: has no enabled entry named pgkeep.dev");
        assert!(!c.archives_wal());
        let c =
            cluster(serde_json::json!({"spec": {"plugins": [{"name": "pgkeep.dev", "parameters": {"stanza": "../x", "stanzaa": "y"}}]}}));
        let errors = validate(&c);
        let paths: Vec<_> = errors.iter().map(|e| e.path.join(".")).collect();
        assert_eq!(paths, ["spec.plugins[0].parameters.stanzaa", "spec.plugins[0].parameters.stanza", "spec.plugins[0].isWALArchiver"]);
        assert_eq!(errors[1].value, "../x");
        let c =
            cluster(serde_json::json!({"spec": {"plugins": [{"name": "pgkeep.dev"}], "bootstrap": {"recovery": {"source": "nowhere"}}}}));
        assert_eq!(c.stanza_for(Purpose::Own).unwrap_err().message, "is required: the name of the pgkeep Stanza");
        assert_eq!(c.stanza_for(Purpose::Recovery).unwrap_err().path.join("."), "spec.bootstrap.recovery.source");
        // Not in recovery and no primary: a WAL restore is the cluster's own.
        assert_eq!(c.stanza_for(Purpose::RestoreWal).unwrap_err().path.join("."), "spec.plugins[0].parameters.stanza");
        assert!(Cluster::from_json(b"[1]").is_err());
    }

    #[test]
    fn restores_are_served_only_as_the_recovery_source_or_the_archiver_and_archive_timeout_reads_like_postgres() {
        let running = |archiver: bool| {
            cluster(
                serde_json::json!({"spec": {"plugins": [{"name": "pgkeep.dev", "isWALArchiver": archiver, "parameters": {"stanza": "a"}}]}, "status": {"currentPrimary": "pg-1"}}),
            )
        };
        assert!(running(true).serves_wal_restore());
        assert!(!running(false).serves_wal_restore());
        // Bootstrapping from another source: not ours, whatever spec.plugins says.
        let other = cluster(
            serde_json::json!({"spec": {"plugins": [{"name": "pgkeep.dev", "isWALArchiver": true, "parameters": {"stanza": "a"}}],
            "bootstrap": {"recovery": {"source": "b"}}, "externalClusters": [{"name": "b", "plugin": {"name": "barman-cloud.cloudnative-pg.io"}}]}}),
        );
        assert!(!other.serves_wal_restore());
        let ours = cluster(
            serde_json::json!({"spec": {"bootstrap": {"recovery": {"source": "b"}}, "externalClusters": [{"name": "b", "plugin": {"name": "pgkeep.dev", "parameters": {"stanza": "x"}}}]}}),
        );
        assert!(ours.serves_wal_restore());
        assert_eq!(running(true).archive_timeout_secs(), Some(300));
        for (text, secs) in [
            ("300", Some(300)),
            ("30s", Some(30)),
            ("2min", Some(120)),
            ("1h", Some(3600)),
            ("1500ms", Some(2)),
            ("0", None),
            ("5 fortnights", None),
        ] {
            let c = cluster(serde_json::json!({"spec": {"postgresql": {"parameters": {"archive_timeout": text}}}}));
            assert_eq!(c.archive_timeout_secs(), secs, "{text}");
        }
        assert!(!valid_stanza_name("-x") && !valid_stanza_name(".x") && !valid_stanza_name("a/b") && valid_stanza_name("a.b-c_1"));
    }

    #[test]
    fn the_backup_type_defaults_to_full_and_refuses_what_it_does_not_know() {
        let b = |params: serde_json::Value| -> Backup {
            serde_json::from_value(
                serde_json::json!({"spec": {"method": "plugin", "pluginConfiguration": {"name": "pgkeep.dev", "parameters": params}}}),
            )
            .unwrap()
        };
        assert_eq!(backup_type(&b(serde_json::json!({}))).unwrap(), "full");
        assert_eq!(backup_type(&b(serde_json::json!({"type": "incr"}))).unwrap(), "incr");
        assert_eq!(
            backup_type(&b(serde_json::json!({"type": "weekly"}))).unwrap_err().to_string(),
            "spec.pluginConfiguration.parameters.type: must be full, diff or incr"
        );
        assert_eq!(
            backup_type(&b(serde_json::json!({"typ": "incr"}))).unwrap_err().path.join("."),
            "spec.pluginConfiguration.parameters.typ"
        );
        assert_eq!(backup_type(&Backup::default()).unwrap(), "full");
    }
}
