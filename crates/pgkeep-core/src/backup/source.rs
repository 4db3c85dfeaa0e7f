//! Which server a backup reads (`backup-standby`): the primary, or a
//! streaming standby of it.
//!
//! From a standby, the backup starts and stops on the standby (a
//! non-exclusive backup there: `pg_backup_start` makes a restartpoint,
//! `pg_backup_stop` ends the backup at the standby's minimum recovery
//! point), its files are read from the standby's data directory, and the
//! primary is only asked to switch WAL so that the segment holding the
//! backup's end is archived. `docs/standby.md` gives the argument, from
//! PostgreSQL's source, for each step.
//!
//! A standby is used only when it is in recovery, of the repository's
//! system, streaming from a primary (`pg_stat_wal_receiver`), and its
//! replay is at most `standby-max-lag` behind the primary's WAL; with
//! `prefer`, a standby that fails one of these (or cannot be reached) is
//! passed over for the primary, and the backup says why.

use std::path::{Path, PathBuf};

use crate::config::{BackupStandby, PgAddress, Settings};
use crate::error::{Error, Result};
use crate::pg::Pg;
use crate::repo::manifest::FileIdentity;
use crate::repo::{Repository, ServerRole};
use crate::types::{human_bytes, Lsn};

/// The server a backup reads, connected.
pub struct Source {
    /// The server whose files are read, on which the backup starts and
    /// stops.
    pub pg: Pg,
    /// Its data directory.
    pub data: PathBuf,
    /// Its role.
    pub role: ServerRole,
    /// When reading a standby: the primary, asked to switch WAL at the
    /// end and to measure the standby's lag.
    pub primary: Option<Pg>,
    /// With `backup-standby = prefer`, why the standby was passed over.
    pub passed_over: Option<String>,
    /// `standby-max-lag`, in bytes.
    pub max_lag: u64,
}

/// Why a standby cannot be used: `Unusable` lets `prefer` fall back to
/// the primary; `Error` (another system, a wrong data directory, a
/// broken primary) is a configuration error whatever the mode.
enum Passed {
    Unusable(String),
    Error(Error),
}

impl From<Error> for Passed {
    fn from(e: Error) -> Self {
        Passed::Error(e)
    }
}

/// Connects to the server the backup reads, as `backup-standby` says, and
/// checks it.
pub async fn choose(settings: &Settings, repo: &Repository) -> Result<Source> {
    let primary = Pg::connect(&settings.pg).await?;
    repo.check_system_id(primary.system_id().await?, &format!("the server at {}", primary.describe))?;
    let mode = settings.standby.mode;
    if mode == BackupStandby::Local {
        return local(primary, settings).await;
    }
    if primary.in_recovery().await? {
        return Err(Error::Input(match mode {
            BackupStandby::N => format!(
                "the server at {} is a standby: pg-host/pg-port must name the primary (to back up from a standby, set backup-standby and standby-host/standby-port/standby-data)",
                primary.describe
            ),
            _ => format!(
                "the server at {} is a standby: pg-host/pg-port must name the primary, and standby-host/standby-port the standby",
                primary.describe
            ),
        }));
    }
    let from_primary = |primary: Pg, passed_over: Option<String>| async move {
        let data = settings.pg_data()?.to_path_buf();
        check_data_directory(&primary, &data, "pg-data").await?;
        Ok(Source { pg: primary, data, role: ServerRole::Primary, primary: None, passed_over, max_lag: settings.standby.max_lag })
    };
    let Some((data, address)) = settings.standby.server.clone() else { return from_primary(primary, None).await };
    match (standby(&address, &data, &primary, repo, settings.standby.max_lag).await, mode) {
        (Ok(pg), _) => {
            Ok(Source { pg, data, role: ServerRole::Standby, primary: Some(primary), passed_over: None, max_lag: settings.standby.max_lag })
        }
        (Err(Passed::Error(e)), _) => Err(e),
        (Err(Passed::Unusable(why)), BackupStandby::Prefer) => from_primary(primary, Some(why)).await,
        (Err(Passed::Unusable(why)), _) => Err(Error::Refused(format!(
            "{why}; the backup was not started: fix the standby, or set backup-standby to prefer (or n) to back up from the primary"
        ))),
    }
}

/// `backup-standby = local`: the server pg-host/pg-port names, primary or
/// standby, alone. A standby is read as with `y` but for what needs the
/// primary (the lag, the WAL switch); it must be in recovery and not
/// replaying another timeline than its control file's (checked at stop).
async fn local(pg: Pg, settings: &Settings) -> Result<Source> {
    let data = settings.pg_data()?.to_path_buf();
    check_data_directory(&pg, &data, "pg-data").await?;
    let role = if pg.in_recovery().await? { ServerRole::Standby } else { ServerRole::Primary };
    Ok(Source { pg, data, role, primary: None, passed_over: None, max_lag: settings.standby.max_lag })
}

/// Connects to the standby at `address` and checks that a backup may read
/// it.
async fn standby(address: &PgAddress, data: &Path, primary: &Pg, repo: &Repository, max_lag: u64) -> Result<Pg, Passed> {
    let describe = address.describe();
    let pg = match Pg::connect_to(address, "standby-host/standby-port/pg-user").await {
        Ok(pg) => pg,
        Err(e) => return Err(Passed::Unusable(format!("the standby is not usable: {e}"))),
    };
    let system = pg.system_id().await?;
    if system != repo.system.system_id {
        return Err(Passed::Error(Error::Refused(format!(
            "the standby at {describe} is of another system ({system}) than stanza '{}' ({}); fix standby-host/standby-port",
            repo.meta.stanza, repo.system.system_id
        ))));
    }
    let state = pg.standby_state().await?;
    if !state.in_recovery {
        return Err(Passed::Unusable(format!("the standby at {describe} is not in recovery (promoted?)")));
    }
    if state.receiver.as_deref() != Some("streaming") {
        return Err(Passed::Unusable(format!(
            "the standby at {describe} is not streaming from the primary (its WAL receiver is {})",
            state.receiver.as_deref().unwrap_or("not running")
        )));
    }
    let lag = lag(primary, state.replay).await?;
    if lag > max_lag {
        return Err(Passed::Unusable(format!(
            "the standby at {describe} replays {} behind the primary, more than standby-max-lag ({})",
            human_bytes(lag),
            human_bytes(max_lag)
        )));
    }
    check_data_directory(&pg, data, "standby-data").await?;
    Ok(pg)
}

/// How far `replay` (a standby's replay position) is behind the primary's
/// WAL insert position, in bytes.
pub async fn lag(primary: &Pg, replay: Option<Lsn>) -> Result<u64> {
    let head = primary.current_lsn().await?;
    Ok(head.0.saturating_sub(replay.map_or(0, |r| r.0)))
}

/// The server and the configured data directory (`key`) must be the same
/// directory, or the backup would copy another cluster's files.
async fn check_data_directory(pg: &Pg, data: &Path, key: &str) -> Result<()> {
    let server = pg.data_directory().await?;
    let same = match (std::fs::canonicalize(&server), std::fs::canonicalize(data)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(Error::Input(format!(
            "{key} is {} but the server at {} runs on {server}; fix {key} for this stanza",
            data.display(),
            pg.describe
        )));
    }
    Ok(())
}

/// The identity of the data directory `data` (see [`FileIdentity`]).
pub fn directory_identity(data: &Path) -> Result<FileIdentity> {
    let meta = std::fs::metadata(data).map_err(Error::io(format!("cannot read {}", data.display())))?;
    Ok(FileIdentity::of(&meta))
}
