//! `cnpgi.wal.v1.RestoreJobHooks`: the recovery Job of a Cluster that
//! bootstraps from `bootstrap.recovery.source`, an external cluster whose
//! plugin is pgkeep.
//!
//! Restore chooses the backup for the Cluster's `recoveryTarget` (the
//! newest that ends before it, on the target's timeline; or the one
//! `backupID`, else the external cluster's `backup` parameter, names),
//! restores it into the stanza's `pg-data`, and answers the configuration
//! PostgreSQL recovers with: `restore_command` (CloudNativePG's instance
//! manager, which calls this socket's WAL Restore) and
//! `recovery_target_action = 'promote'`, plus the timeline when the chosen
//! backup needs one named. CloudNativePG appends the target itself
//! (`RecoveryTarget.BuildPostgresOptions`). A target no backup can reach
//! is refused here, before anything is written, with the engine's reason.
//!
//! With `check_empty_wal_archive`, the stanza the new cluster will archive
//! into (its own `spec.plugins` entry) must hold no WAL and no backup, even
//! when it is the stanza recovered from: a clone promoted into its
//! source's stanza would make later recoveries of the source follow the
//! clone's timeline. CloudNativePG's `cnpg.io/skipEmptyWalArchiveCheck`
//! annotation (for a deliberate in-place recovery) turns the check off.
//!
//! Nothing of recovery, archiving or replication is written into
//! `postgresql.auto.conf` (and what the backup's copy holds of them is
//! removed): CloudNativePG never empties that file, PostgreSQL reads it
//! last, and pg_basebackup copies it to every replica, where a recovery
//! target would stop (or promote) them.

use std::path::Path;
use std::sync::Arc;

use pgkeep_cnpgi::cluster::{Cluster, Purpose, RecoveryTarget};
use pgkeep_cnpgi::proto::wal::restore_job_hooks_capability::Kind;
use pgkeep_cnpgi::proto::wal::restore_job_hooks_server::RestoreJobHooks;
use pgkeep_cnpgi::proto::wal::{
    RestoreJobHooksCapabilitiesRequest, RestoreJobHooksCapabilitiesResult, RestoreJobHooksCapability, RestoreRequest, RestoreResponse,
};
use pgkeep_core::restore::{parse_timeline, target, ArchiveMode, RestoreOptions, Target, TargetAction};
use pgkeep_core::types::BackupLabel;
use pgkeep_core::{Error, Stanza};
use tonic::{Request, Response, Status};

use super::{cluster, engine_status, Plugin};

/// The RestoreJobHooks service.
pub struct RestoreJobService(pub Arc<Plugin>);

#[tonic::async_trait]
impl RestoreJobHooks for RestoreJobService {
    async fn get_capabilities(
        &self,
        _: Request<RestoreJobHooksCapabilitiesRequest>,
    ) -> Result<Response<RestoreJobHooksCapabilitiesResult>, Status> {
        Ok(Response::new(RestoreJobHooksCapabilitiesResult {
            capabilities: vec![RestoreJobHooksCapability { kind: Kind::Restore as i32 }],
        }))
    }

    async fn restore(&self, req: Request<RestoreRequest>) -> Result<Response<RestoreResponse>, Status> {
        let req = req.into_inner();
        let cluster = cluster(&req.cluster_definition)?;
        let (stanza, source) = self.0.stanza(&cluster, Purpose::Recovery)?;
        if req.check_empty_wal_archive.unwrap_or_else(|| cluster.empty_archive_check_enabled()) {
            self.check_destination(&cluster).await?;
        }
        let wanted = cluster.recovery_target().cloned().unwrap_or_default();
        let timezone = cluster.spec.postgresql.as_ref().and_then(|p| p.parameters.get("timezone")).map(String::as_str);
        let mut opts = options(&wanted, timezone).map_err(|e| engine_status(&e))?;
        let set = Some(wanted.backup_id.clone()).filter(|s| !s.is_empty()).or(source.backup.clone());
        opts.set = set.as_deref().map(BackupLabel::parse).transpose().map_err(|e| engine_status(&e))?;
        opts.restore_command = self.0.cfg.restore_command.clone();
        // CloudNativePG writes the recovery settings (custom.conf) and
        // never empties postgresql.auto.conf, which is read last and copied
        // to every replica: nothing of recovery, archiving or replication
        // may be left there.
        opts.settings_elsewhere = true;
        opts.archive_mode = Some(ArchiveMode::Preserve);
        let report = pgkeep_core::restore::run(&stanza, &opts).await.map_err(|e| engine_status(&e))?;
        eprintln!(
            "pgkeep: restored backup {} of stanza {} from repo {} into {} ({} files)",
            report.label.0,
            stanza.name(),
            report.repo,
            report.pg_data.display(),
            report.files
        );
        // WAL on a volume of its own: pg_wal a link to it before PostgreSQL
        // replays anything (CloudNativePG 1.30.0 does this only for its
        // in-tree recovery; later releases skip it when the link is there).
        if cluster.spec.wal_storage.is_some() {
            link_wal_dir(&report.pg_data, &self.0.cfg.wal_dir).map_err(|e| {
                Status::internal(format!("cannot move pg_wal of {} to {}: {e}", report.pg_data.display(), self.0.cfg.wal_dir.display()))
            })?;
        }
        let mut config =
            format!("recovery_target_action = 'promote'\nrestore_command = '{}'\n", self.0.cfg.restore_command.replace('\'', "''"));
        // CloudNativePG writes recovery_target_timeline only when the
        // Cluster names one; else the engine's choice for this backup.
        if let (true, Some(tl)) = (wanted.target_tli.is_empty(), &report.timeline) {
            config.push_str(&format!("recovery_target_timeline = '{tl}'\n"));
        }
        Ok(Response::new(RestoreResponse { restore_config: config, envs: Vec::new() }))
    }
}

impl RestoreJobService {
    /// Refuses to bootstrap a cluster whose own stanza (where it will
    /// archive) already holds backups or WAL, the stanza it recovers from
    /// included.
    async fn check_destination(&self, cluster: &Cluster) -> Result<(), Status> {
        let Ok(own) = cluster.stanza_for(Purpose::Own) else { return Ok(()) };
        let settings = self.0.cfg.stanzas.settings(&own.stanza).map_err(|e| engine_status(&e))?;
        match super::first_used_repo(&Stanza::new(settings)).await.map_err(|e| engine_status(&e))? {
            None => Ok(()),
            Some(used) => Err(Status::failed_precondition(format!(
                "expected an empty archive: stanza '{}' ({}.stanza), where this cluster will archive, already holds {} WAL segments and {} backups in repo {}; give the new cluster a stanza of its own (or annotate it cnpg.io/skipEmptyWalArchiveCheck=enabled to write into this one)",
                own.stanza, own.path, used.segments, used.backups, used.repo
            ))),
        }
    }
}

/// Moves the content of `data/pg_wal` into `wal_dir` and makes `pg_wal` a
/// link to it (nothing when it is that link already).
fn link_wal_dir(data: &Path, wal_dir: &Path) -> std::io::Result<()> {
    let pg_wal = data.join("pg_wal");
    if std::fs::read_link(&pg_wal).is_ok_and(|l| l == wal_dir) {
        return Ok(());
    }
    std::fs::create_dir_all(wal_dir)?;
    move_content(&pg_wal, wal_dir)?;
    std::fs::remove_dir(&pg_wal)?;
    std::os::unix::fs::symlink(wal_dir, &pg_wal)
}

/// Moves every entry of `from` into `to`, copying across filesystems (the
/// WAL volume is another one).
fn move_content(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if std::fs::rename(&src, &dst).is_ok() {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&dst)?;
            move_content(&src, &dst)?;
            std::fs::remove_dir(&src)?;
        } else {
            std::fs::copy(&src, &dst)?;
            std::fs::File::open(&dst)?.sync_all()?;
            std::fs::remove_file(&src)?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}

/// A `targetTime`: RFC 3339 or PostgreSQL's form. Without a zone,
/// PostgreSQL reads it in the server's `timezone` (CloudNativePG passes
/// that form on unchanged): UTC when the Cluster sets none or UTC, else
/// refused rather than guessed.
fn cnpg_time(text: &str, timezone: Option<&str>) -> pgkeep_core::Result<chrono::DateTime<chrono::Utc>> {
    target::parse_time(text).or_else(|e| {
        let t = text.trim();
        let naive = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M"]
            .iter()
            .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok())
            .ok_or(e)?;
        let utc = timezone
            .is_none_or(|z| ["utc", "etc/utc", "gmt", "etc/gmt", "uct", "z", "zulu"].contains(&z.trim().to_ascii_lowercase().as_str()));
        if !utc {
            return Err(pgkeep_core::Error::Input(format!(
                "targetTime '{text}' has no time zone and the cluster's timezone is '{}': write the zone in targetTime (e.g. '{t}+00')",
                timezone.unwrap_or_default()
            )));
        }
        Ok(naive.and_utc())
    })
}

/// The engine's restore options for CloudNativePG's `recoveryTarget`;
/// `timezone` is the Cluster's `timezone` parameter.
fn options(t: &RecoveryTarget, timezone: Option<&str>) -> pgkeep_core::Result<RestoreOptions> {
    let target = if !t.target_time.is_empty() {
        Some(Target::Time(cnpg_time(&t.target_time, timezone)?))
    } else if !t.target_lsn.is_empty() {
        Some(Target::Lsn(t.target_lsn.parse()?))
    } else if !t.target_xid.is_empty() {
        let xid = t
            .target_xid
            .trim()
            .parse::<u64>()
            .map_err(|_| Error::Input(format!("targetXID '{}' is not a transaction id", t.target_xid)))?;
        Some(Target::Xid(xid))
    } else if !t.target_name.is_empty() {
        Some(Target::Name(t.target_name.clone()))
    } else if t.target_immediate == Some(true) {
        Some(Target::Immediate)
    } else {
        None
    };
    Ok(RestoreOptions {
        exclusive: t.exclusive == Some(true) && target.is_some(),
        target,
        action: TargetAction::Promote,
        timeline: Some(t.target_tli.as_str()).filter(|s| !s.is_empty()).map(parse_timeline).transpose()?,
        ..RestoreOptions::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_target_becomes_the_engines() {
        let t = |v: serde_json::Value| options(&serde_json::from_value(v).unwrap(), None);
        assert_eq!(t(serde_json::json!({})).unwrap().target, None);
        assert!(matches!(t(serde_json::json!({"targetTime": "2026-01-02 03:04:05+00"})).unwrap().target, Some(Target::Time(_))));
        assert_eq!(t(serde_json::json!({"targetLSN": "0/3000028"})).unwrap().target, Some(Target::Lsn("0/3000028".parse().unwrap())));
        assert_eq!(t(serde_json::json!({"targetXID": "1234"})).unwrap().target, Some(Target::Xid(1234)));
        assert_eq!(t(serde_json::json!({"targetName": "before"})).unwrap().target, Some(Target::Name("before".into())));
        assert_eq!(t(serde_json::json!({"targetImmediate": true})).unwrap().target, Some(Target::Immediate));
        let o = t(serde_json::json!({"targetLSN": "0/3000028", "exclusive": true, "targetTLI": "2"})).unwrap();
        assert_eq!((o.exclusive, o.timeline.as_deref()), (true, Some("2")));
        assert!(t(serde_json::json!({"targetXID": "x"})).is_err());
        assert!(t(serde_json::json!({"targetTime": "yesterday"})).is_err());
        // Without a zone: UTC, as CloudNativePG says.
        let Some(Target::Time(utc)) = t(serde_json::json!({"targetTime": "2026-01-02 03:04:05"})).unwrap().target else { panic!() };
        assert_eq!(utc.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let zoned =
            |tz: &str| options(&serde_json::from_value(serde_json::json!({"targetTime": "2026-01-02 03:04:05"})).unwrap(), Some(tz));
        assert!(zoned("Etc/UTC").is_ok());
        assert!(zoned("Europe/Rome").unwrap_err().to_string().contains("has no time zone and the cluster's timezone is 'Europe/Rome'"));
        assert!(t(serde_json::json!({"targetTLI": "0"})).is_err());
    }
}
