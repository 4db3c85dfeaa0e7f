//! The agent's HTTP server (see [`crate::api`] for the routes).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgkeep_core::config::Settings;
use pgkeep_core::pg::Pg;
use pgkeep_core::Stanza;
use tokio::sync::Mutex;

use crate::api::{AgentStatus, ApiError, ArchiverStats, BackupRequest, Expired, Role, StanzaCreated};
use crate::jobs::{Jobs, Runner, StartError};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The token callers must present.
    pub token: String,
    /// The stanza, resolved from the config file.
    pub settings: Settings,
    /// How backups run.
    pub runner: Runner,
}

/// Shared by the handlers.
pub struct Agent {
    cfg: AgentConfig,
    jobs: Arc<Jobs>,
    /// The repository's `info`, cached for metrics scrapes.
    info: InfoCache,
}

/// How long a scrape reuses a repository's `info`.
const INFO_CACHE: Duration = Duration::from_secs(30);

/// Each stanza's `info` (the engine's JSON), kept [`INFO_CACHE`] for
/// metrics scrapes: every pod's agent reports the same repository.
#[derive(Default)]
pub struct InfoCache(Mutex<BTreeMap<String, (Instant, serde_json::Value)>>);

impl InfoCache {
    /// The `info` of `stanza`, at most [`INFO_CACHE`] old when `cached`.
    pub async fn get(&self, stanza: &Stanza, cached: bool) -> pgkeep_core::Result<serde_json::Value> {
        let mut map = self.0.lock().await;
        if let (true, Some((at, v))) = (cached, map.get(stanza.name())) {
            if at.elapsed() < INFO_CACHE {
                return Ok(v.clone());
            }
        }
        let info = pgkeep_core::info::collect(stanza).await?;
        let v = serde_json::to_value(&info).map_err(|e| pgkeep_core::Error::Input(format!("cannot encode info: {e}")))?;
        map.insert(stanza.name().to_owned(), (Instant::now(), v.clone()));
        Ok(v)
    }

    /// Forgets what is cached of stanza `name` (its backups changed).
    pub async fn forget(&self, name: &str) {
        self.0.lock().await.remove(name);
    }
}

impl Agent {
    /// The agent over `cfg`.
    pub fn new(cfg: AgentConfig) -> Arc<Agent> {
        Agent::with_jobs(cfg, Arc::new(Jobs::default()))
    }

    /// The agent over `cfg`, sharing `jobs` with another front end of the
    /// same process (one backup at a time, whoever asks).
    pub fn with_jobs(cfg: AgentConfig, jobs: Arc<Jobs>) -> Arc<Agent> {
        Arc::new(Agent { cfg, jobs, info: InfoCache::default() })
    }

    /// The jobs (for metrics).
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// The stanza's name.
    pub fn stanza_name(&self) -> &str {
        &self.cfg.settings.stanza
    }

    /// What the local server says of itself.
    pub async fn status(&self) -> pgkeep_core::Result<AgentStatus> {
        local_status(&self.cfg.settings, self.jobs.running()).await
    }

    /// The engine's `info` of the stanza, at most [`INFO_CACHE`] old when
    /// `cached`.
    pub async fn info(&self, cached: bool) -> pgkeep_core::Result<serde_json::Value> {
        self.info.get(&Stanza::new(self.cfg.settings.clone()), cached).await
    }
}

/// What the server of `settings` says of itself; `running` is the id of
/// the backup job this agent runs, if any.
pub async fn local_status(settings: &Settings, running: Option<String>) -> pgkeep_core::Result<AgentStatus> {
    let pg = Pg::connect(&settings.pg).await?;
    let state = pg.standby_state().await?;
    let (role, lsn) = match (state.in_recovery, state.replay) {
        (true, Some(replay)) => (Role::Standby, replay),
        (true, None) => (Role::Standby, pgkeep_core::types::Lsn(0)),
        (false, _) => (Role::Primary, pg.current_lsn().await?),
    };
    let a = pg.archiver().await?;
    Ok(AgentStatus {
        stanza: settings.stanza.clone(),
        role,
        system_id: pg.system_id().await?.to_string(),
        pg_version: pg.version_num().await?,
        lsn: lsn.to_string(),
        streaming: state.receiver.as_deref() == Some("streaming"),
        archive: ArchiverStats {
            archived_count: a.archived_count,
            last_archived_wal: a.last_archived_wal,
            last_archived_time: a.last_archived_time,
            failed_count: a.failed_count,
            last_failed_wal: a.last_failed_wal,
            last_failed_time: a.last_failed_time,
        },
        running,
    })
}

/// The router, for [`serve`] and tests.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/info", get(info))
        .route("/v1/stanza", axum::routing::post(create_stanza))
        .route("/v1/backups", axum::routing::post(start_backup))
        .route("/v1/backups/{id}", get(get_backup).delete(cancel_backup))
        .route("/v1/repository/backups/{label}", axum::routing::delete(expire_backup))
        .with_state(agent)
}

/// Serves until `shutdown` resolves.
pub async fn serve(agent: Arc<Agent>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(agent.cfg.listen).await?;
    axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await
}

fn error(status: StatusCode, retryable: bool, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into(), retryable })).into_response()
}

fn core_error(e: &pgkeep_core::Error) -> Response {
    let retryable = e.retryable();
    error(StatusCode::INTERNAL_SERVER_ERROR, retryable, pgkeep_core::error::OneLine(e).to_string())
}

/// Whether the request carries the token (compared in constant time).
fn authorized(agent: &Agent, headers: &HeaderMap) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), agent.cfg.token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

macro_rules! require_token {
    ($agent:expr, $headers:expr) => {
        if !authorized(&$agent, &$headers) {
            return error(StatusCode::UNAUTHORIZED, false, "no or wrong bearer token: use the token of the Stanza's agent Secret");
        }
    };
}

async fn status(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> Response {
    require_token!(agent, headers);
    match agent.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => core_error(&e),
    }
}

async fn info(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> Response {
    require_token!(agent, headers);
    match agent.info(false).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => core_error(&e),
    }
}

async fn create_stanza(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> Response {
    require_token!(agent, headers);
    let status = match agent.status().await {
        Ok(s) => s,
        Err(e) => return core_error(&e),
    };
    if status.role != Role::Primary {
        return error(StatusCode::CONFLICT, true, "this server is a standby: create the stanza from the primary's agent");
    }
    match pgkeep_core::stanza::create(&Stanza::new(agent.cfg.settings.clone())).await {
        Ok(repos) => Json(StanzaCreated { system_id: status.system_id, repos }).into_response(),
        Err(e) => core_error(&e),
    }
}

async fn start_backup(State(agent): State<Arc<Agent>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    require_token!(agent, headers);
    let req: BackupRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, false, format!("malformed backup request: {e}")),
    };
    if let Some(job) = agent.jobs.get(&req.id) {
        return Json(job).into_response();
    }
    // The role decides what the backup reads; ask the server now.
    let role = match agent.status().await {
        Ok(s) => s.role,
        Err(e) => return core_error(&e),
    };
    match agent.jobs.start(&agent.cfg.runner, req, role) {
        Ok(job) => Json(job).into_response(),
        Err(StartError::Busy(id)) => error(StatusCode::CONFLICT, true, format!("backup {id} runs on this agent: wait for it")),
        Err(StartError::Invalid(msg)) => error(StatusCode::BAD_REQUEST, false, msg),
        Err(StartError::Spawn(msg)) => error(StatusCode::INTERNAL_SERVER_ERROR, true, msg),
    }
}

async fn expire_backup(State(agent): State<Arc<Agent>>, headers: HeaderMap, Path(label): Path<String>) -> Response {
    require_token!(agent, headers);
    let stanza = Stanza::new(agent.cfg.settings.clone());
    let opts = pgkeep_core::expire::ExpireOptions {
        repo: 0,
        set: Some(pgkeep_core::types::BackupLabel(label)),
        with_dependents: false,
        dry_run: false,
    };
    match pgkeep_core::expire::run_each(&stanza, None, &opts).await {
        Ok(r) if r.failed.is_empty() => {
            let repos = r.done.iter().map(|d| (d.repo, d.expired.iter().map(|(l, _)| l.0.clone()).collect())).collect();
            agent.info.forget(&agent.cfg.settings.stanza).await;
            Json(Expired { repos }).into_response()
        }
        Ok(r) => {
            let (_, e) = &r.failed[0];
            let status = if matches!(e.kind(), pgkeep_core::Error::NotFound(_)) { StatusCode::NOT_FOUND } else { StatusCode::CONFLICT };
            error(status, e.retryable(), pgkeep_core::error::OneLine(e).to_string())
        }
        Err(e) => core_error(&e),
    }
}

async fn get_backup(State(agent): State<Arc<Agent>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    require_token!(agent, headers);
    match agent.jobs.get(&id) {
        Some(job) => Json(job).into_response(),
        None => error(StatusCode::NOT_FOUND, false, format!("this agent runs no backup {id} (it restarted, or never ran it)")),
    }
}

async fn cancel_backup(State(agent): State<Arc<Agent>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    require_token!(agent, headers);
    match agent.jobs.cancel(&id) {
        Some(job) => Json(job).into_response(),
        None => error(StatusCode::NOT_FOUND, false, format!("this agent runs no backup {id}")),
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let text = crate::metrics::render(&agent).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
