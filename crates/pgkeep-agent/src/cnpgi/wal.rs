//! `cnpgi.wal.v1.WAL`: PostgreSQL's `archive_command` and
//! `restore_command`, which CloudNativePG's instance manager turns into
//! Archive and Restore calls on this socket.
//!
//! - **Archive** archives into every repository of the cluster's stanza
//!   (the engine's `archive-push`, asynchronous through the spool when the
//!   stanza says `archive-async`), and only when the Cluster makes pgkeep
//!   its WAL archiver (`isWALArchiver: true`): CloudNativePG calls every
//!   enabled plugin that can archive, whatever that field says. Archiving
//!   the same file again is accepted (the repository compares content).
//!   With `check_empty_wal_archive` (CloudNativePG sets it until the first
//!   file of a new or restored cluster is archived) the stanza is created
//!   when it does not exist, and refused when it already holds WAL on this
//!   file's timeline or a later one: a new cluster must not write into an
//!   archive another cluster is writing.
//! - **Restore** writes one archived file where PostgreSQL asks, from the
//!   recovery source's stanza while the cluster is bootstrapped, else from
//!   its own. `MODE_RECOVERY` uses the prefetcher when the stanza says
//!   `archive-async`; `MODE_REWIND` (pg_rewind) fetches exactly the file.
//!   Answers `NOT_FOUND` only when the archive answered that it does not
//!   have the file; see [`super::PluginConfig::standby_restore_retry`] for
//!   every other failure.
//! - **Status**: the first and last archived segment.
//! - **SetFirstRequired**: recorded (Status reports it as
//!   `first-required`) and nothing removed: retention is the stanza's (`repo-retention-*`,
//!   applied after each backup), which never removes WAL a kept backup
//!   needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep_cnpgi::cluster::Purpose;
use pgkeep_cnpgi::proto::wal::wal_capability::rpc::Type;
use pgkeep_cnpgi::proto::wal::wal_capability::{self, Rpc};
use pgkeep_cnpgi::proto::wal::wal_restore_request::Mode;
use pgkeep_cnpgi::proto::wal::wal_server::Wal;
use pgkeep_cnpgi::proto::wal::*;
use pgkeep_core::types::{WalFileName, WalSegment};
use pgkeep_core::wal::{async_push, prefetch};
use pgkeep_core::{Error, Stanza};
use pgkeep_core::{Hint, Operation};
use tonic::{Request, Response, Status};

use super::{cluster, data_dir, engine_status, Plugin};

/// The WAL service.
pub struct WalService(pub Arc<Plugin>);

#[tonic::async_trait]
impl Wal for WalService {
    async fn get_capabilities(&self, _: Request<WalCapabilitiesRequest>) -> Result<Response<WalCapabilitiesResult>, Status> {
        let rpc = |t: Type| WalCapability { r#type: Some(wal_capability::Type::Rpc(Rpc { r#type: t as i32 })) };
        Ok(Response::new(WalCapabilitiesResult {
            capabilities: vec![rpc(Type::ArchiveWal), rpc(Type::RestoreWal), rpc(Type::Status), rpc(Type::SetFirstRequired)],
        }))
    }

    async fn archive(&self, req: Request<WalArchiveRequest>) -> Result<Response<WalArchiveResult>, Status> {
        let req = req.into_inner();
        let cluster = cluster(&req.cluster_definition)?;
        if !cluster.archives_wal() {
            if !self.0.warned_not_archiver.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "pgkeep: WARNING: CloudNativePG asks pgkeep to archive WAL but the Cluster does not make pgkeep.dev its WAL archiver (isWALArchiver): nothing is stored, and pgkeep backups of it cannot complete"
                );
            }
            return Ok(Response::new(WalArchiveResult {}));
        }
        let (stanza, _) = self.0.stanza(&cluster, Purpose::Own)?;
        let path = absolute(&req.source_file_name)?;
        let data = data_dir(&stanza.settings, &path).to_path_buf();
        let sending = pgkeep_core::pg::data_dir_system_id(&data);
        // CloudNativePG says whether to check; one that predates the field
        // (1.30.0 included) leaves its marker file in a new data directory.
        let check = match req.check_empty_wal_archive {
            Some(c) => c,
            None => data.join(CHECK_EMPTY_FILE).exists() && cluster.empty_archive_check_enabled(),
        };
        if check {
            let key = (stanza.name().to_owned(), sending.map(|s| s.to_string()).unwrap_or_default());
            let passed = self.0.empty_checked.lock().unwrap().contains(&key);
            if !passed {
                ensure_empty(&stanza).await.map_err(|e| engine_status(&e))?;
                self.0.empty_checked.lock().unwrap().insert(key);
            }
            // As CloudNativePG's own archiver does: the check is made once,
            // for the first file of a new cluster.
            match std::fs::remove_file(data.join(CHECK_EMPTY_FILE)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("pgkeep: cannot remove {}: {e}", data.join(CHECK_EMPTY_FILE).display()),
            }
        }
        let stanza = stanza.serving_system(sending);
        let mut result = push(&stanza, &path).await;
        // A new cluster archiving into a stanza nobody created yet (the
        // empty-archive check skipped by annotation): create it for the
        // server that is running, and push again.
        if let Err(e) = &result {
            if e.hint() == Some(&Hint::run(Operation::StanzaCreate)) {
                pgkeep_core::stanza::create(&stanza).await.map_err(|e| engine_status(&e))?;
                result = push(&stanza, &path).await;
            }
        }
        result.map_err(|e| engine_status(&e))?;
        Ok(Response::new(WalArchiveResult {}))
    }

    async fn restore(&self, req: Request<WalRestoreRequest>) -> Result<Response<WalRestoreResult>, Status> {
        let req = req.into_inner();
        let cluster = cluster(&req.cluster_definition)?;
        // CloudNativePG asks every plugin in turn: say at once that the
        // file is not here when pgkeep is not where this cluster's WAL is.
        if !cluster.serves_wal_restore() {
            return Err(Status::not_found(format!(
                "pgkeep.dev is not the WAL source of this cluster: {} is not here",
                req.source_wal_name
            )));
        }
        let dest = absolute(&req.destination_file_name)?;
        let rewind = req.mode == Mode::Rewind as i32;
        // While the cluster is bootstrapped no primary exists: an answer
        // other than success or "not found" would end recovery here, so
        // every failure is retried, reading the stanza's config included.
        let deadline =
            if cluster.status.current_primary.is_empty() { None } else { Some(Instant::now() + self.0.cfg.standby_restore_retry) };
        let mut pause = Duration::from_millis(250);
        loop {
            let attempt = async {
                let (stanza, _) = self.0.stanza(&cluster, Purpose::RestoreWal).map_err(Failure::Status)?;
                let asking = pgkeep_core::pg::data_dir_system_id(data_dir(&stanza.settings, &dest));
                let stanza = stanza.serving_system(asking);
                if rewind || !stanza.settings.archive.asynchronous {
                    pgkeep_core::wal::get(&stanza, &req.source_wal_name, &dest).await.map_err(Failure::Engine)
                } else {
                    let s = stanza.clone();
                    let start = move || {
                        let s = s.clone();
                        tokio::spawn(async move {
                            if let Err(e) = prefetch::worker(&s).await {
                                eprintln!("pgkeep: prefetcher of stanza {}: {}", s.name(), pgkeep_core::error::OneLine(&e));
                            }
                        });
                        Ok(())
                    };
                    prefetch::get(&stanza, &req.source_wal_name, &dest, &start).await.map_err(Failure::Engine)
                }
            };
            let why = match attempt.await {
                Ok(()) => return Ok(Response::new(WalRestoreResult {})),
                Err(Failure::Engine(e)) if matches!(e.kind(), Error::NotFound(_)) => return Err(engine_status(&e)),
                Err(f) if deadline.is_some_and(|d| Instant::now() >= d) => return Err(f.into_status()),
                Err(f) => f.into_status().message().to_owned(),
            };
            eprintln!("pgkeep: cannot restore {} (retrying in {} ms): {why}", req.source_wal_name, pause.as_millis());
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(15));
        }
    }

    async fn status(&self, req: Request<WalStatusRequest>) -> Result<Response<WalStatusResult>, Status> {
        let cluster = cluster(&req.into_inner().cluster_definition)?;
        let (stanza, _) = self.0.stanza(&cluster, Purpose::Own)?;
        let (first, last, repo) = archived_range(&stanza).await.map_err(|e| engine_status(&e))?;
        let mut info = std::collections::HashMap::new();
        info.insert("stanza".to_owned(), stanza.name().to_owned());
        info.insert("repo".to_owned(), repo.to_string());
        if let Some(first) = self.0.first_required(stanza.name()) {
            info.insert("first-required".to_owned(), first);
        }
        Ok(Response::new(WalStatusResult { first_wal: first, last_wal: last, additional_information: info }))
    }

    async fn set_first_required(&self, req: Request<SetFirstRequiredRequest>) -> Result<Response<SetFirstRequiredResult>, Status> {
        let req = req.into_inner();
        let cluster = cluster(&req.cluster_definition)?;
        let (stanza, _) = self.0.stanza(&cluster, Purpose::Own)?;
        if !req.first_required_wal.is_empty() && WalFileName::parse(&req.first_required_wal).is_none() {
            return Err(Status::invalid_argument(format!("'{}' is not a WAL file name", req.first_required_wal)));
        }
        self.0.first_required.lock().unwrap().insert(stanza.name().to_owned(), req.first_required_wal);
        Ok(Response::new(SetFirstRequiredResult {}))
    }
}

/// Why one restore attempt failed.
enum Failure {
    /// Before the engine ran (the Cluster's parameters, the config file).
    Status(Status),
    /// The engine's.
    Engine(Error),
}

impl Failure {
    fn into_status(self) -> Status {
        match self {
            Failure::Status(s) => s,
            Failure::Engine(e) => engine_status(&e),
        }
    }
}

/// The file CloudNativePG leaves in a new data directory until the first
/// WAL file is archived (`.check-empty-wal-archive`).
pub const CHECK_EMPTY_FILE: &str = ".check-empty-wal-archive";

/// CloudNativePG sends absolute paths (`BuildWALPath`); a relative one
/// would be read against the agent's own directory.
fn absolute(path: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(Status::invalid_argument(format!("'{path}' is not an absolute path")))
    }
}

/// `archive-push`, through the spool when the stanza says `archive-async`
/// (its worker a task of this process).
async fn push(stanza: &Stanza, path: &Path) -> pgkeep_core::Result<()> {
    if !stanza.settings.archive.asynchronous {
        return pgkeep_core::wal::push(stanza, path).await.map(|_| ());
    }
    let (s, p) = (stanza.clone(), path.to_path_buf());
    let start = move || {
        let (s, p) = (s.clone(), p.clone());
        tokio::spawn(async move {
            if let Err(e) = async_push::worker(&s, &p).await {
                eprintln!("pgkeep: archive worker of stanza {}: {}", s.name(), pgkeep_core::error::OneLine(&e));
            }
        });
        Ok(())
    };
    for w in async_push::push(stanza, path, &start).await? {
        eprintln!("pgkeep: warning: {w}");
    }
    Ok(())
}

/// The first and last archived segment of the stanza's first repository
/// that can be read (empty names when it holds none), and its number.
async fn archived_range(stanza: &Stanza) -> pgkeep_core::Result<(String, String, usize)> {
    let mut first_error = None;
    for number in 1..=stanza.settings.repos.len() {
        let attempt = async {
            let repo = stanza.open(number).await?;
            let seg_size = repo.system.wal_segment_size;
            let segments: Vec<WalSegment> = repo.list_segments().await?.into_iter().map(|(s, _)| s).collect();
            let name = |s: Option<&WalSegment>| s.map(|s| s.name(seg_size)).unwrap_or_default();
            Ok::<_, Error>((name(segments.iter().min()), name(segments.iter().max())))
        };
        match attempt.await {
            Ok((first, last)) => return Ok((first, last, number)),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    Err(first_error.unwrap_or_else(|| Error::Input("the stanza has no repository".into())))
}

/// For the first file a new or restored cluster archives (CloudNativePG's
/// `check_empty_wal_archive`): creates the stanza where it does not exist
/// (for the system of the running server), and refuses one that already
/// holds WAL or backups, as CloudNativePG refuses a used object store: two
/// clusters writing one archive make a recovery follow the wrong one's
/// timeline. A cluster restored in place into its old stanza is let
/// through by CloudNativePG's `cnpg.io/skipEmptyWalArchiveCheck`
/// annotation, with which it never asks.
async fn ensure_empty(stanza: &Stanza) -> pgkeep_core::Result<()> {
    pgkeep_core::stanza::create(stanza).await?;
    match super::first_used_repo(stanza).await? {
        None => Ok(()),
        Some(used) => Err(Error::Refused(format!(
            "expected an empty WAL archive for this new cluster, but stanza '{}' in repo {} already holds {} backups and WAL up to {}; give the cluster its own stanza, or annotate it cnpg.io/skipEmptyWalArchiveCheck=enabled to write into this one",
            stanza.name(),
            used.repo,
            used.backups,
            used.newest.as_deref().unwrap_or("none")
        ))),
    }
}
