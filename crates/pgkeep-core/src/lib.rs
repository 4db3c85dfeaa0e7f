//! # pgkeep-core
//!
//! The pgkeep engine: continuous WAL archiving, hot physical backups and
//! point-in-time restore of PostgreSQL, to and from a local directory, S3,
//! GCS or Azure. It knows nothing of terminals: the `pgkeep` binary (and
//! later the Kubernetes operator) parse input, show output and call it.
//!
//! The map of the crate:
//!
//! - [`config`]: the option structs shared by the TOML file and the flags;
//! - [`storage`]: one interface over `object_store` backends;
//! - [`repo`]: the repository format (stanza metadata, WAL archive,
//!   backups and their manifests), see `docs/repository-format.md`;
//! - [`pg`]: the connection to PostgreSQL and WAL header checks;
//! - [`wal`]: `archive-push` and `archive-get`;
//! - [`backup`], [`restore`], [`expire`]: plan, then execute;
//! - [`info`], [`stanza`], [`verify`], [`drill`]: reports, stanza set-up,
//!   checks, and restore drills (`verify --restore`);
//! - [`types`]: `Lsn`, `TimelineId`, `WalSegment`, `BackupLabel`, ...
//!
//! ```no_run
//! # async fn demo() -> pgkeep_core::Result<()> {
//! use pgkeep_core::config::{ConfigFile, RepoOptions, Settings, StanzaOptions};
//! let file = ConfigFile::load("/etc/pgkeep/pgkeep.toml".as_ref(), true)?;
//! let settings = Settings::resolve(&file, Some("demo"), StanzaOptions::default(), RepoOptions::default(), 1)?;
//! let stanza = pgkeep_core::Stanza::new(settings);
//! let manifest = pgkeep_core::backup::run(&stanza, &Default::default()).await?.manifest;
//! println!("backup {} holds {} bytes", manifest.label, manifest.size);
//! # Ok(()) }
//! ```

pub mod backup;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod drill;
pub mod error;
pub mod expire;
pub mod info;
pub mod pg;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod stanza;
pub mod storage;
pub mod types;
pub mod verify;
pub mod wal;
pub mod workers;

pub use error::{Error, Hint, Operation, Opt, Result};

use config::Settings;
use repo::Repository;
use storage::Store;

/// Narrows this process's umask so that whatever it creates (repository
/// objects on a local directory, spool files, restored files before their
/// recorded mode is set) is at most `rw-r-----` and directories at most
/// `rwxr-x---`, as pgBackRest does: backups hold password hashes and must
/// not be left readable by every local user because the caller's umask
/// was 0022. A stricter umask (PostgreSQL runs `archive_command` under
/// 0077) stays as it is. Returns the umask now in force. The front ends
/// call it once at start; a library embedding the engine should too.
pub fn restrict_file_modes() -> u32 {
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_raw_mode(0o027));
    let narrowed = old.as_raw_mode() | 0o027;
    rustix::process::umask(Mode::from_raw_mode(narrowed));
    narrowed
}

/// What an operation over several repositories did: the reports of those
/// where it succeeded, and the failures of the others.
#[derive(Debug)]
pub struct PerRepo<T> {
    /// Reports, in repository order.
    pub done: Vec<T>,
    /// (repository number, why it failed there).
    pub failed: Vec<(usize, Error)>,
}

/// Runs `op` in each repository of `numbers`: with `stop`, the first
/// failure is the result; else failures are collected and the others go
/// on.
pub async fn each_of<T, F, Fut>(numbers: Vec<usize>, stop: bool, mut op: F) -> Result<PerRepo<T>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut out = PerRepo { done: Vec::new(), failed: Vec::new() };
    for number in numbers {
        match op(number).await {
            Ok(r) => out.done.push(r),
            Err(e) if stop => return Err(e),
            Err(e) => out.failed.push((number, e)),
        }
    }
    Ok(out)
}

/// A stanza as configured: the entry point of every operation.
#[derive(Debug, Clone)]
pub struct Stanza {
    /// Resolved settings.
    pub settings: Settings,
    /// The system of the stanza's history whose WAL archive-get serves
    /// (that of the cluster asking); `None`: the current one.
    pub wal_system: Option<types::SystemId>,
}

impl Stanza {
    /// Wraps resolved settings.
    pub fn new(settings: Settings) -> Self {
        Stanza { settings, wal_system: None }
    }

    /// This stanza, with the WAL of system `id` (when given) served by
    /// [`Stanza::open`]'s repositories instead of the current system's.
    pub fn serving_system(self, id: Option<types::SystemId>) -> Self {
        Stanza { wal_system: id, ..self }
    }

    /// The name of the stanza.
    pub fn name(&self) -> &str {
        &self.settings.stanza
    }

    /// Opens the store of repository `number` (1-based).
    pub fn store(&self, number: usize) -> Result<Store> {
        let opts = self.settings.repos.get(number.wrapping_sub(1)).ok_or_else(|| {
            Error::Input(format!("repo {number} is not configured ({} configured)", self.settings.repos.len()))
                .with_hint(Hint::retry(Opt::Repo))
        })?;
        Store::open(&opts.store())
    }

    /// Opens the stanza in repository `number`.
    pub async fn open(&self, number: usize) -> Result<Repository> {
        self.open_serving(number).await?
    }

    /// [`Stanza::open`], telling a repository that cannot be opened (the
    /// outer error) from one that has never held the system `wal_system`
    /// names (the inner one): it holds none of that system's WAL, which
    /// `archive-get` may answer as "not here" when another repository
    /// holds the system.
    pub async fn open_serving(&self, number: usize) -> Result<Result<Repository>> {
        let repo = Repository::open(&self.store(number)?, self.name(), number, self.settings.passphrase(number)?.as_deref()).await?;
        Ok(match self.wal_system {
            Some(id) => repo.for_system(id, "the data directory this runs in (by its global/pg_control)"),
            None => Ok(repo),
        })
    }

    /// The repositories an operation over "every repository unless one is
    /// named" works on.
    pub fn repo_numbers(&self, named: Option<usize>) -> Vec<usize> {
        match named {
            Some(n) => vec![n],
            None => (1..=self.settings.repos.len()).collect(),
        }
    }

    /// Runs `op` in repository `named`, whose failure is the result, or in
    /// every repository, where one that fails does not stop the others:
    /// its failure is collected beside the others' reports.
    pub async fn each_repo<T, F, Fut>(&self, named: Option<usize>, op: F) -> Result<PerRepo<T>>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        each_of(self.repo_numbers(named), named.is_some(), op).await
    }

    /// Opens the stanza in every repository.
    pub async fn open_all(&self) -> Result<Vec<Repository>> {
        let mut out = Vec::new();
        for n in 1..=self.settings.repos.len() {
            out.push(self.open(n).await?);
        }
        Ok(out)
    }
}
