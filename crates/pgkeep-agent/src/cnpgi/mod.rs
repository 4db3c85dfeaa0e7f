//! CloudNativePG's instance-side plugin services (CNPG-I), served by the
//! agent on a Unix socket (`pgkeep agent --plugin-socket
//! /plugins/pgkeep.dev`), backed by the engine:
//!
//! - [`identity`]: who we are and which services we offer;
//! - [`wal`]: `archive_command` and `restore_command`, through
//!   CloudNativePG's instance manager;
//! - [`backup`]: a backup of this instance, as a child `pgkeep backup`;
//! - [`restore_job`]: the recovery Job's restore into PGDATA;
//! - [`metrics`]: the agent's metrics, in CNPG-I's shape.
//!
//! Every request carries the `Cluster` as JSON: the stanza is the one its
//! parameters name ([`pgkeep_cnpgi::cluster::Cluster::stanza_for`]), read
//! at each request from the agent's config file (a ConfigMap that may
//! change under the running pod).

pub mod backup;
pub mod identity;
pub mod metrics;
pub mod restore_job;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pgkeep_cnpgi::cluster::{Cluster, ParamError, Purpose, StanzaRef};
use pgkeep_cnpgi::proto;
use pgkeep_core::config::Settings;
use pgkeep_core::Stanza;
use tonic::Status;

use crate::jobs::{Jobs, Runner};

/// Where the agent reads a stanza's settings.
pub trait StanzaSource: Send + Sync {
    /// The settings of stanza `name`, as the config file says now.
    fn settings(&self, name: &str) -> pgkeep_core::Result<Settings>;
}

/// How the plugin runs.
#[derive(Clone)]
pub struct PluginConfig {
    /// The Unix socket to serve on.
    pub socket: PathBuf,
    /// The stanzas.
    pub stanzas: Arc<dyn StanzaSource>,
    /// How backups run (global arguments without `--stanza`).
    pub runner: Runner,
    /// The `restore_command` the recovery Job's PostgreSQL gets:
    /// CloudNativePG's instance manager, which calls [`wal`]'s Restore on
    /// this socket.
    pub restore_command: String,
    /// This instance's name (the pod's), reported with backups.
    pub instance: String,
    /// How long a WAL restore for a standby retries a failure that is
    /// not "the archive does not have it" before answering it (the
    /// standby then streams from the primary instead). While a cluster is
    /// bootstrapped from a backup, a restore retries until it succeeds or
    /// the archive answers that it does not have the file: CloudNativePG
    /// turns every error into the same exit status as "not found", on
    /// which PostgreSQL would end recovery early and promote.
    pub standby_restore_retry: Duration,
    /// Where a Cluster with `spec.walStorage` keeps `pg_wal` (its WAL
    /// volume; CloudNativePG's `/var/lib/postgresql/wal/pg_wal`).
    pub wal_dir: PathBuf,
}

/// CloudNativePG's `pg_wal` on the WAL volume (`specs.PgWalVolumePgWalPath`).
pub const CNPG_WAL_DIR: &str = "/var/lib/postgresql/wal/pg_wal";

/// The default `restore_command` of a recovery: CloudNativePG's own, as
/// its in-tree recovery and its plugins write it.
pub const CNPG_RESTORE_COMMAND: &str = "/controller/manager wal-restore --log-destination /controller/log/postgres.json %f %p";

/// The plugin's state, shared by its services.
pub struct Plugin {
    cfg: PluginConfig,
    jobs: Arc<Jobs>,
    /// Each stanza's `info`, cached for metrics.
    info: crate::server::InfoCache,
    /// The first WAL CloudNativePG last said it needs, per stanza.
    first_required: std::sync::Mutex<BTreeMap<String, String>>,
    /// (stanza, system) whose empty-archive check passed in this process.
    empty_checked: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Whether the "not the WAL archiver" warning was given.
    warned_not_archiver: std::sync::atomic::AtomicBool,
}

impl Plugin {
    /// The plugin over `cfg`, running backups in `jobs` (shared with the
    /// agent's HTTP API when both run).
    pub fn new(cfg: PluginConfig, jobs: Arc<Jobs>) -> Arc<Plugin> {
        Arc::new(Plugin {
            cfg,
            jobs,
            info: Default::default(),
            first_required: Default::default(),
            empty_checked: Default::default(),
            warned_not_archiver: Default::default(),
        })
    }

    /// The stanza `cluster` names for `purpose`.
    fn stanza(&self, cluster: &Cluster, purpose: Purpose) -> Result<(Stanza, StanzaRef), Status> {
        let r = cluster.stanza_for(purpose).map_err(param_status)?;
        let settings = self.cfg.stanzas.settings(&r.stanza).map_err(|e| engine_status(&e))?;
        Ok((Stanza::new(settings), r))
    }

    /// The first WAL CloudNativePG said stanza `name` must keep.
    pub fn first_required(&self, name: &str) -> Option<String> {
        self.first_required.lock().unwrap().get(name).cloned()
    }
}

/// What a repository of a stanza already holds.
pub(crate) struct Used {
    /// The repository.
    pub repo: usize,
    /// Its backups.
    pub backups: usize,
    /// Its archived segments.
    pub segments: usize,
    /// The newest of them.
    pub newest: Option<String>,
}

/// The first repository of `stanza` that holds any backup or WAL, if any;
/// a repository where the stanza was never created holds none.
pub(crate) async fn first_used_repo(stanza: &Stanza) -> pgkeep_core::Result<Option<Used>> {
    for number in 1..=stanza.settings.repos.len() {
        let repo = match stanza.open(number).await {
            Ok(r) => r,
            Err(e) if e.hint() == Some(&pgkeep_core::Hint::run(pgkeep_core::Operation::StanzaCreate)) => continue,
            Err(e) => return Err(e),
        };
        let seg_size = repo.system.wal_segment_size;
        let segments: Vec<_> = repo.list_segments().await?.into_iter().map(|(s, _)| s).collect();
        let backups = repo.backups().await?.len();
        if !segments.is_empty() || backups > 0 {
            let newest = segments.iter().max().map(|s| s.name(seg_size));
            return Ok(Some(Used { repo: number, backups, segments: segments.len(), newest }));
        }
    }
    Ok(None)
}

/// Reads the `Cluster` of a request.
fn cluster(json: &[u8]) -> Result<Cluster, Status> {
    Cluster::from_json(json).map_err(Status::invalid_argument)
}

/// A parameter mistake as gRPC's status.
fn param_status(e: ParamError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// An engine error as gRPC's status: "not found" only for what the
/// archive does not have.
pub fn engine_status(e: &pgkeep_core::Error) -> Status {
    use pgkeep_core::Error as E;
    let msg = pgkeep_core::error::OneLine(e).to_string();
    match e.kind() {
        E::NotFound(_) => Status::not_found(msg),
        E::Input(_) => Status::invalid_argument(msg),
        E::Refused(_) => Status::failed_precondition(msg),
        E::Corrupt(_) => Status::data_loss(msg),
        E::Storage { .. } | E::Postgres { .. } => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

/// The data directory a WAL file at `wal_path` (in `pg_wal`) belongs to:
/// the stanza's `pg-data` when set, else the directory above `pg_wal`.
fn data_dir<'a>(settings: &'a Settings, wal_path: &'a Path) -> &'a Path {
    settings.pg.pg_data.as_deref().unwrap_or_else(|| wal_path.parent().and_then(Path::parent).unwrap_or(Path::new(".")))
}

/// Serves the instance services on the Unix socket until `shutdown`.
/// A socket file left by an earlier run is replaced.
pub async fn serve(plugin: Arc<Plugin>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let path = plugin.cfg.socket.clone();
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .add_service(proto::identity::identity_server::IdentityServer::new(pgkeep_cnpgi::identity::IdentityService {
            services: identity::SERVICES,
        }))
        .add_service(proto::wal::wal_server::WalServer::from_arc(Arc::new(wal::WalService(plugin.clone()))))
        .add_service(proto::backup::backup_server::BackupServer::from_arc(Arc::new(backup::BackupService(plugin.clone()))))
        .add_service(proto::wal::restore_job_hooks_server::RestoreJobHooksServer::from_arc(Arc::new(restore_job::RestoreJobService(
            plugin.clone(),
        ))))
        .add_service(proto::metrics::metrics_server::MetricsServer::from_arc(Arc::new(metrics::MetricsService(plugin.clone()))))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    result.map_err(std::io::Error::other)
}
