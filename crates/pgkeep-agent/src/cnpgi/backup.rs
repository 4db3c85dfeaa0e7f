//! `cnpgi.backup.v1.Backup`: a backup of this instance, which
//! CloudNativePG picked (its `Backup.spec.target`).
//!
//! The backup runs as a child `pgkeep backup` (see [`crate::jobs`]), in the
//! agent's one job slot, keyed by the `Backup`'s uid: a call repeated for
//! the same `Backup` follows the run in progress (or its result) instead
//! of starting another, and runs again when the last attempt failed.
//! The type is the `Backup`'s `pluginConfiguration.parameters.type`
//! (`full` when not given). pgkeep must be the cluster's WAL archiver: a
//! backup waits for its last WAL segment in pgkeep's repository.
//!
//! On a standby (CloudNativePG's default target is `prefer-standby`) the
//! backup reads the standby alone (`backup-standby = local`,
//! docs/standby.md): no connection to the primary, whose users are
//! CloudNativePG's; the last segment is archived when the primary
//! completes it, within its `archive_timeout`, which the wait allows for.

use std::sync::Arc;
use std::time::Duration;

use pgkeep_cnpgi::cluster::{backup_type, Backup, Purpose};
use pgkeep_cnpgi::proto::backup::backup_capability::rpc::Type;
use pgkeep_cnpgi::proto::backup::backup_capability::{self, Rpc};
use pgkeep_cnpgi::proto::backup::backup_server;
use pgkeep_cnpgi::proto::backup::{
    BackupCapabilitiesRequest, BackupCapabilitiesResult, BackupCapability, BackupRequest as CnpgiBackupRequest, BackupResult,
};
use tonic::{Request, Response, Status};

use super::{cluster, engine_status, param_status, Plugin};
use crate::api::{BackupRequest, JobState, Role};
use crate::jobs::StartError;

/// Seconds a standby's backup waits for its last segment beyond the
/// primary's `archive_timeout`: the switch, then the archiving itself.
const STANDBY_WAIT_MARGIN: u64 = 120;

/// The Backup service.
pub struct BackupService(pub Arc<Plugin>);

#[tonic::async_trait]
impl backup_server::Backup for BackupService {
    async fn get_capabilities(&self, _: Request<BackupCapabilitiesRequest>) -> Result<Response<BackupCapabilitiesResult>, Status> {
        Ok(Response::new(BackupCapabilitiesResult {
            capabilities: vec![BackupCapability { r#type: Some(backup_capability::Type::Rpc(Rpc { r#type: Type::Backup as i32 })) }],
        }))
    }

    async fn backup(&self, req: Request<CnpgiBackupRequest>) -> Result<Response<BackupResult>, Status> {
        let req = req.into_inner();
        let cluster = cluster(&req.cluster_definition)?;
        let mut backup: Backup = serde_json::from_slice(&req.backup_definition)
            .map_err(|e| Status::invalid_argument(format!("the Backup definition is not a CloudNativePG Backup: {e}")))?;
        // The parameters of the call are the Backup's (or its
        // ScheduledBackup's); either place may hold them.
        if !req.parameters.is_empty() {
            let conf = backup.spec.plugin_configuration.get_or_insert_with(Default::default);
            conf.parameters.extend(req.parameters);
        }
        let kind = backup_type(&backup).map_err(param_status)?;
        let (stanza, at) = self.0.stanza(&cluster, Purpose::Own)?;
        if !cluster.archives_wal() {
            return Err(Status::failed_precondition(format!(
                "pgkeep is not this cluster's WAL archiver: set isWALArchiver: true beside {} (a backup needs its WAL in pgkeep's repository)",
                at.path
            )));
        }
        let status = crate::server::local_status(&stanza.settings, None).await.map_err(|e| engine_status(&e))?;
        // A first backup may come before the first archived file, which
        // creates the stanza: create it now (a no-op when it exists for
        // this system; refused when it holds another).
        pgkeep_core::stanza::create(&stanza).await.map_err(|e| engine_status(&e))?;
        let mut runner = self.0.cfg.runner.for_stanza(stanza.name());
        if status.role == Role::Standby {
            // No connection to the primary from here (CloudNativePG's users
            // are not ours to use): the standby is read alone and the
            // backup waits for the primary to complete its last segment,
            // which archive_timeout bounds.
            let Some(timeout) = cluster.archive_timeout_secs() else {
                return Err(Status::failed_precondition(
                    "this instance is a standby and the cluster's archive_timeout is 0 (off): a backup here would wait for its last WAL segment for as long as the primary writes nothing; set spec.postgresql.parameters.archive_timeout (CloudNativePG's default is 5min) or the Backup's target to primary",
                ));
            };
            runner.standby_alone = Some(timeout + STANDBY_WAIT_MARGIN);
        }
        let id = if backup.metadata.uid.is_empty() { backup.metadata.name.clone() } else { backup.metadata.uid.clone() };
        // A Backup called again after a failure (its instance restarted)
        // runs again; a running or completed one is followed.
        self.0.jobs.forget_failed(&id);
        let job = BackupRequest { id: id.clone(), kind, repo: None, primary: None };
        match self.0.jobs.start(&runner, job, status.role) {
            Ok(_) => {}
            Err(StartError::Busy(other)) => {
                return Err(Status::unavailable(format!("backup {other} runs on this instance: try again when it ends")))
            }
            Err(StartError::Invalid(msg)) => return Err(Status::invalid_argument(msg)),
            Err(StartError::Spawn(msg)) => return Err(Status::internal(msg)),
        }
        let job = loop {
            match self.0.jobs.get(&id) {
                Some(j) if j.state == JobState::Running => tokio::time::sleep(Duration::from_millis(250)).await,
                Some(j) => break j,
                None => return Err(Status::internal(format!("backup {id} was forgotten while it ran"))),
            }
        };
        let Some(done) = job.backup.filter(|_| job.state == JobState::Completed) else {
            return Err(Status::internal(job.error.unwrap_or_else(|| "the backup failed".into())));
        };
        let unix = |t: &str, or: Option<&str>| {
            [Some(t), or]
                .into_iter()
                .flatten()
                .find_map(pgkeep_core::types::parse_rfc3339)
                .map(|d| d.timestamp())
                .unwrap_or_else(|| chrono::Utc::now().timestamp())
        };
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("stanza".to_owned(), stanza.name().to_owned());
        metadata.insert("type".to_owned(), done.kind.clone());
        metadata.insert("size".to_owned(), done.size.to_string());
        metadata.insert("repo-size".to_owned(), done.repo_size.to_string());
        Ok(Response::new(BackupResult {
            backup_id: done.label.clone(),
            backup_name: done.label.clone(),
            started_at: unix(&done.start_time, Some(&job.started_at)),
            stopped_at: unix(&done.stop_time, job.stopped_at.as_deref()),
            begin_wal: done.start_wal.clone(),
            end_wal: done.stop_wal.clone(),
            begin_lsn: done.start_lsn.clone(),
            end_lsn: done.stop_lsn.clone(),
            backup_label_file: Vec::new(),
            tablespace_map_file: Vec::new(),
            instance_id: self.0.cfg.instance.clone(),
            online: true,
            metadata,
        }))
    }
}
