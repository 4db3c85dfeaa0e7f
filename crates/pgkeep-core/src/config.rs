//! Configuration: one set of option structs serves the TOML file (serde,
//! kebab-case, unknown keys refused) and the command line (clap flags of the
//! same names). Flags override the file.
//!
//! ```toml
//! [stanza.demo]
//! pg-data = "/var/lib/postgresql/15/main"
//! pg-host = "/var/run/postgresql"
//! pg-port = 5432
//!
//! [[repo]]
//! location = "/var/lib/pgkeep"
//! compress = "zstd"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::codec::Compress;
use crate::error::{Error, Hint, Opt, Result};

/// Where the stanza's PostgreSQL lives, and how its WAL is archived.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StanzaOptions {
    /// Data directory of the cluster.
    #[arg(long, global = true)]
    pub pg_data: Option<PathBuf>,
    /// Socket directory (starts with /) or host name of the server.
    #[arg(long, global = true)]
    pub pg_host: Option<String>,
    /// Port of the server (default 5432).
    #[arg(long, global = true)]
    pub pg_port: Option<u16>,
    /// User to connect as (default postgres).
    #[arg(long, global = true)]
    pub pg_user: Option<String>,
    /// Database to connect to (default postgres).
    #[arg(long, global = true)]
    pub pg_database: Option<String>,
    /// Archive asynchronously: `archive-push` hands WAL to a background
    /// worker that stores several segments at once, and `archive-get`
    /// fetches the next segments ahead of recovery.
    #[arg(long, global = true)]
    pub archive_async: Option<bool>,
    /// Local directory for asynchronous archiving: status files, the queue
    /// of a repository that is down, prefetched WAL (default
    /// /var/spool/pgkeep; must be writable by the postgres user).
    #[arg(long, global = true)]
    pub spool_path: Option<PathBuf>,
    /// Most WAL queued in the spool for one repository that is down, like
    /// 4GiB (default: no limit). Past it that repository misses segments,
    /// which `verify` then reports as a gap; the other repositories do not.
    #[arg(long, global = true)]
    pub archive_push_queue_max: Option<String>,
    /// How much WAL `archive-get` fetches ahead of recovery (default 128MiB).
    #[arg(long, global = true)]
    pub archive_get_queue_max: Option<String>,
    /// Where backups read the files: `n` the primary (default), `y` the
    /// streaming standby named by the `standby-*` keys, `prefer` that
    /// standby when it streams and keeps up, else the primary.
    #[arg(long, global = true)]
    pub backup_standby: Option<BackupStandby>,
    /// Data directory of the standby that `backup-standby` uses.
    #[arg(long, global = true)]
    pub standby_data: Option<PathBuf>,
    /// Socket directory or host name of that standby (default: pg-host).
    #[arg(long, global = true)]
    pub standby_host: Option<String>,
    /// Port of that standby (default: pg-port).
    #[arg(long, global = true)]
    pub standby_port: Option<u16>,
    /// How far the standby's replay may be behind the primary's WAL, when
    /// the backup starts and when it ends, like 1GiB (default 1GiB).
    #[arg(long, global = true)]
    pub standby_max_lag: Option<String>,
}

/// Where backups read the files (`backup-standby`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackupStandby {
    /// The primary.
    #[default]
    N,
    /// The standby; refuse when it cannot be used.
    Y,
    /// The standby when it can be used, else the primary.
    Prefer,
    /// The server pg-host/pg-port names, which may be a standby, with no
    /// connection to the primary (no lag check, no WAL switch: the end is
    /// archived when the primary completes that segment, which its
    /// `archive_timeout` bounds). For an agent beside a standby that
    /// cannot reach the primary as a superuser (CloudNativePG's plugin);
    /// docs/standby.md.
    Local,
}

/// One repository: where backups and WAL are stored, and how.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepoOptions {
    /// A directory, or s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(long, global = true)]
    pub location: Option<String>,
    /// Endpoint URL: of an S3-compatible server (s3://), of the blob
    /// service (az://, default https://ACCOUNT.blob.core.windows.net), or
    /// of the JSON API (gs://).
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    /// S3: region (default us-east-1).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// S3: path-style requests (needed by most S3-compatible servers).
    #[arg(long, global = true)]
    pub path_style: Option<bool>,
    /// S3: access key id (default: the AWS_ACCESS_KEY_ID variable).
    #[arg(long, global = true)]
    pub access_key_id: Option<String>,
    /// S3: secret access key (default: the AWS_SECRET_ACCESS_KEY variable).
    #[arg(long, global = true)]
    pub secret_access_key: Option<String>,
    /// Object stores: seconds one request may take before it is retried
    /// (retries stop after a minute, or this, if shorter); default 120.
    #[arg(long, global = true)]
    pub io_timeout: Option<u64>,
    /// Compression of stored objects: zstd, lz4, gzip or none.
    #[arg(long, global = true)]
    pub compress: Option<Compress>,
    /// Compression level (codec-specific; default a fast level).
    #[arg(long, global = true)]
    pub compress_level: Option<i32>,
    /// Number of full backups to keep, with their chains (applied by
    /// `expire`, which runs after every backup).
    #[arg(long, global = true)]
    pub retention_full: Option<u32>,
    /// Number of differential backups to keep, with their incrementals.
    #[arg(long, global = true)]
    pub retention_diff: Option<u32>,
    /// Keep what a recovery to any point in this window needs: 30d, 12h, 2w.
    #[arg(long, global = true)]
    pub retention_window: Option<String>,
    /// File holding the passphrase that encrypts the repository (default:
    /// the PGKEEP_CIPHER_PASS variable; neither: not encrypted).
    #[arg(long, global = true)]
    pub cipher_pass_file: Option<PathBuf>,
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigFile {
    /// Parallel workers for backup and restore.
    pub jobs: Option<usize>,
    /// Seconds to wait for WAL to reach the archive (check, backup).
    pub archive_timeout: Option<u64>,
    /// Stanzas by name.
    #[serde(default)]
    pub stanza: BTreeMap<String, StanzaOptions>,
    /// Repositories, in order: repo 1 first.
    #[serde(default)]
    pub repo: Vec<RepoOptions>,
}

impl ConfigFile {
    /// Reads and parses a TOML file. A missing file is an error only when
    /// `required` (the user named it).
    pub fn load(path: &Path, required: bool) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Self::default()),
            Err(e) => {
                return Err(Error::Input(format!("cannot read config file {}: {e}", path.display())).with_hint(Hint::retry(Opt::Config)))
            }
        };
        Self::parse(&text).map_err(|e| Error::Input(format!("config file {}: {e}", path.display())))
    }

    /// Parses TOML text; the error is one line naming the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let msg = e.message().replace('\n', " ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!("line {line}: {msg}")
                }
                None => msg,
            }
        })
    }
}

impl StanzaOptions {
    /// Fills the fields not set in `self` from `file`.
    pub fn or(self, file: &StanzaOptions) -> StanzaOptions {
        StanzaOptions {
            pg_data: self.pg_data.or_else(|| file.pg_data.clone()),
            pg_host: self.pg_host.or_else(|| file.pg_host.clone()),
            pg_port: self.pg_port.or(file.pg_port),
            pg_user: self.pg_user.or_else(|| file.pg_user.clone()),
            pg_database: self.pg_database.or_else(|| file.pg_database.clone()),
            archive_async: self.archive_async.or(file.archive_async),
            spool_path: self.spool_path.or_else(|| file.spool_path.clone()),
            archive_push_queue_max: self.archive_push_queue_max.or_else(|| file.archive_push_queue_max.clone()),
            archive_get_queue_max: self.archive_get_queue_max.or_else(|| file.archive_get_queue_max.clone()),
            backup_standby: self.backup_standby.or(file.backup_standby),
            standby_data: self.standby_data.or_else(|| file.standby_data.clone()),
            standby_host: self.standby_host.or_else(|| file.standby_host.clone()),
            standby_port: self.standby_port.or(file.standby_port),
            standby_max_lag: self.standby_max_lag.or_else(|| file.standby_max_lag.clone()),
        }
    }
}

impl StanzaOptions {
    /// The primary's address (`pg-host`, `pg-port`, `pg-user`,
    /// `pg-database`, with their defaults).
    pub fn primary(&self) -> PgAddress {
        PgAddress {
            host: self.pg_host.clone().unwrap_or_else(|| "/var/run/postgresql".into()),
            port: self.pg_port.unwrap_or(5432),
            user: self.pg_user.clone().unwrap_or_else(|| "postgres".into()),
            database: self.pg_database.clone().unwrap_or_else(|| "postgres".into()),
        }
    }
}

impl RepoOptions {
    /// Fills the fields not set in `self` from `file`.
    pub fn or(self, file: &RepoOptions) -> RepoOptions {
        RepoOptions {
            location: self.location.or_else(|| file.location.clone()),
            endpoint: self.endpoint.or_else(|| file.endpoint.clone()),
            region: self.region.or_else(|| file.region.clone()),
            path_style: self.path_style.or(file.path_style),
            access_key_id: self.access_key_id.or_else(|| file.access_key_id.clone()),
            secret_access_key: self.secret_access_key.or_else(|| file.secret_access_key.clone()),
            io_timeout: self.io_timeout.or(file.io_timeout),
            compress: self.compress.or(file.compress),
            compress_level: self.compress_level.or(file.compress_level),
            retention_full: self.retention_full.or(file.retention_full),
            retention_diff: self.retention_diff.or(file.retention_diff),
            retention_window: self.retention_window.or_else(|| file.retention_window.clone()),
            cipher_pass_file: self.cipher_pass_file.or_else(|| file.cipher_pass_file.clone()),
        }
    }

    /// The retention policy of this repository (number `n`, for errors).
    pub fn retention(&self, n: usize) -> Result<Retention> {
        for (key, value) in [("retention-full", self.retention_full), ("retention-diff", self.retention_diff)] {
            if value == Some(0) {
                return Err(Error::Input(format!("{key} of repo {n} is 0: keep at least 1, or leave it out to keep all")));
            }
        }
        let window = self.retention_window.as_deref().map(parse_window).transpose()?;
        Ok(Retention { full: self.retention_full, diff: self.retention_diff, window })
    }

    /// What the store of this repository is opened with.
    pub fn store(&self) -> crate::storage::StoreOptions {
        crate::storage::StoreOptions {
            location: self.location.clone().unwrap_or_default(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            io_timeout: self.io_timeout,
        }
    }

    /// Whether any field is set.
    pub fn is_empty(&self) -> bool {
        self.location.is_none()
            && self.endpoint.is_none()
            && self.region.is_none()
            && self.path_style.is_none()
            && self.access_key_id.is_none()
            && self.secret_access_key.is_none()
            && self.io_timeout.is_none()
            && self.compress.is_none()
            && self.compress_level.is_none()
            && self.retention_full.is_none()
            && self.retention_diff.is_none()
            && self.retention_window.is_none()
            && self.cipher_pass_file.is_none()
    }
}

/// Everything a command needs, resolved from file, flags and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Stanza name.
    pub stanza: String,
    /// PostgreSQL connection and data directory.
    pub pg: StanzaOptions,
    /// The stanza's `pg-data` as the config file has it, before flags: a
    /// restore into it is in place.
    pub configured_pg_data: Option<PathBuf>,
    /// Repositories, repo 1 first; never empty.
    pub repos: Vec<RepoOptions>,
    /// Parallel workers.
    pub jobs: usize,
    /// Seconds to wait for WAL to be archived.
    pub archive_timeout: u64,
    /// Asynchronous archiving.
    pub archive: ArchiveSettings,
    /// Backups from a standby.
    pub standby: StandbySettings,
}

/// Where a server is and how to log in: the primary (`pg-*`) or the
/// standby (`standby-*`, with `pg-user` and `pg-database`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgAddress {
    /// Socket directory or host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Database.
    pub database: String,
}

impl PgAddress {
    /// `host:port`, for messages.
    pub fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Backups from a standby, resolved.
#[derive(Debug, Clone)]
pub struct StandbySettings {
    /// `backup-standby`.
    pub mode: BackupStandby,
    /// The standby's data directory and address; `None` when
    /// `backup-standby` is `n`.
    pub server: Option<(PathBuf, PgAddress)>,
    /// `standby-max-lag` in bytes.
    pub max_lag: u64,
}

/// Default of `standby-max-lag`.
pub const DEFAULT_STANDBY_MAX_LAG: u64 = 1 << 30;

impl StandbySettings {
    fn resolve(stanza: &str, pg: &StanzaOptions) -> Result<StandbySettings> {
        let mode = pg.backup_standby.unwrap_or_default();
        let max_lag = match &pg.standby_max_lag {
            Some(t) => parse_size("standby-max-lag", t)?,
            None => DEFAULT_STANDBY_MAX_LAG,
        };
        let server = match (mode, &pg.standby_data) {
            (BackupStandby::N | BackupStandby::Local, _) => None,
            (_, None) => {
                return Err(Error::Input(format!(
                    "backup-standby is set for stanza '{stanza}' but standby-data is not: name the standby's data directory"
                )))
            }
            (_, Some(data)) => {
                let address = StanzaOptions {
                    pg_host: pg.standby_host.clone().or_else(|| pg.pg_host.clone()),
                    pg_port: pg.standby_port.or(pg.pg_port),
                    ..pg.clone()
                }
                .primary();
                if address == pg.primary() {
                    return Err(Error::Input(format!(
                        "the standby of stanza '{stanza}' has the primary's address {}: set standby-host or standby-port",
                        address.describe()
                    )));
                }
                Some((data.clone(), address))
            }
        };
        Ok(StandbySettings { mode, server, max_lag })
    }
}

/// How WAL is archived and fetched.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    /// `archive-async`.
    pub asynchronous: bool,
    /// `spool-path`.
    pub spool: PathBuf,
    /// `archive-push-queue-max` in bytes; `None`: no limit.
    pub push_queue_max: Option<u64>,
    /// `archive-get-queue-max` in bytes.
    pub get_queue_max: u64,
}

/// Default of `spool-path`.
pub const DEFAULT_SPOOL: &str = "/var/spool/pgkeep";

impl ArchiveSettings {
    fn resolve(pg: &StanzaOptions) -> Result<ArchiveSettings> {
        let size = |key: &str, v: &Option<String>| v.as_deref().map(|t| parse_size(key, t)).transpose();
        Ok(ArchiveSettings {
            asynchronous: pg.archive_async.unwrap_or(false),
            spool: pg.spool_path.clone().unwrap_or_else(|| DEFAULT_SPOOL.into()),
            push_queue_max: size("archive-push-queue-max", &pg.archive_push_queue_max)?,
            get_queue_max: size("archive-get-queue-max", &pg.archive_get_queue_max)?.unwrap_or(128 << 20),
        })
    }
}

/// A retention policy (from the repository's settings).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Retention {
    /// Full backups to keep, with their chains.
    pub full: Option<u32>,
    /// Differential backups to keep, with their incrementals.
    pub diff: Option<u32>,
    /// Keep what a recovery to any point in this window needs.
    pub window: Option<chrono::Duration>,
}

impl Retention {
    /// Whether any rule is set.
    pub fn is_set(&self) -> bool {
        self.full.is_some() || self.diff.is_some() || self.window.is_some()
    }
}

/// Parses a window such as `30d`, `12h`, `2w`, `90m` or `3600s`.
pub fn parse_window(text: &str) -> Result<chrono::Duration> {
    let bad = || Error::Input(format!("retention-window '{text}' is not a duration: write a number and a unit, like 30d, 12h, 2w or 90m"));
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: i64 = t[..split].parse().map_err(|_| bad())?;
    let d = match t[split..].trim() {
        "s" => chrono::Duration::try_seconds(n),
        "m" | "min" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        "w" => chrono::Duration::try_weeks(n),
        _ => None,
    };
    d.filter(|d| *d > chrono::Duration::zero()).ok_or_else(bad)
}

/// Parses a size: bytes, or a number with KiB, MiB, GiB or TiB (KB, MB,
/// GB, TB and K, M, G, T mean the same).
pub fn parse_size(key: &str, text: &str) -> Result<u64> {
    let bad = || Error::Input(format!("{key} '{text}' is not a size: write bytes or a number and a unit, like 512MiB or 4GiB"));
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let shift = match t[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).filter(|v| *v > 0).ok_or_else(bad)
}

impl Settings {
    /// Resolves the settings of `stanza`: `flags` override the file's stanza
    /// section, `repo_flags` override the file's repo `repo_index` (1-based).
    pub fn resolve(
        file: &ConfigFile,
        stanza: Option<&str>,
        flags: StanzaOptions,
        repo_flags: RepoOptions,
        repo_index: usize,
    ) -> Result<Settings> {
        let stanza = match stanza {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => match file.stanza.keys().collect::<Vec<_>>().as_slice() {
                [only] => (*only).clone(),
                _ => return Err(Error::Input("no stanza given".into()).with_hint(Hint::retry(Opt::Stanza))),
            },
        };
        if !stanza.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') || stanza.starts_with('.') {
            return Err(Error::Input(format!("stanza name '{stanza}' may hold only letters, digits, '-', '_' and '.'")));
        }
        let pg = match file.stanza.get(&stanza) {
            Some(section) => flags.or(section),
            None if flags.pg_data.is_some() || flags.pg_port.is_some() || flags.pg_host.is_some() => flags,
            None => {
                let known: Vec<_> = file.stanza.keys().map(String::as_str).collect();
                return Err(Error::Input(format!(
                    "stanza '{stanza}' is not in the config file (it has: {}); add a [stanza.{stanza}] section",
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ))
                .with_hint(Hint::retry(Opt::Stanza)));
            }
        };
        let mut repos = file.repo.clone();
        if repo_index == 0 || repo_index > 4 {
            return Err(Error::Input(format!("repository {repo_index} is out of range: repositories are numbered 1 to 4"))
                .with_hint(Hint::retry(Opt::Repo)));
        }
        if !repo_flags.is_empty() {
            while repos.len() < repo_index {
                repos.push(RepoOptions::default());
            }
            repos[repo_index - 1] = repo_flags.or(&repos[repo_index - 1]);
        }
        if repos.is_empty() {
            return Err(
                Error::Input("no repository configured: add a [[repo]] table with `location`".into()).with_hint(Hint::retry(Opt::Location))
            );
        }
        for (i, r) in repos.iter().enumerate() {
            if r.location.as_deref().unwrap_or("").is_empty() {
                return Err(Error::Input(format!("repo {} has no `location`: set it in its [[repo]] table", i + 1))
                    .with_hint(Hint::retry(Opt::Location)));
            }
            r.retention(i + 1)?;
        }
        let archive = ArchiveSettings::resolve(&pg)?;
        let standby = StandbySettings::resolve(&stanza, &pg)?;
        Ok(Settings {
            standby,
            configured_pg_data: file.stanza.get(&stanza).and_then(|s| s.pg_data.clone()),
            stanza,
            pg,
            archive,
            repos,
            jobs: file.jobs.unwrap_or_else(default_jobs).max(1),
            archive_timeout: file.archive_timeout.unwrap_or(60),
        })
    }

    /// The passphrase of repository `number`: the content of its
    /// `cipher-pass-file` (without the final newline), else the
    /// PGKEEP_CIPHER_PASS variable, else none.
    pub fn passphrase(&self, number: usize) -> Result<Option<Vec<u8>>> {
        let file = self.repos.get(number.wrapping_sub(1)).and_then(|r| r.cipher_pass_file.as_ref());
        let pass = match file {
            Some(path) => {
                let mut text =
                    std::fs::read(path).map_err(|e| Error::Input(format!("cannot read cipher-pass-file {}: {e}", path.display())))?;
                while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    text.pop();
                }
                Some(text)
            }
            None => std::env::var_os("PGKEEP_CIPHER_PASS").map(|v| v.into_encoded_bytes()),
        };
        match pass {
            Some(p) if p.is_empty() => {
                Err(Error::Input(format!("the passphrase of repo {number} is empty; put a long random one in cipher-pass-file")))
            }
            other => Ok(other),
        }
    }

    /// The data directory, or an error saying how to set it.
    pub fn pg_data(&self) -> Result<&Path> {
        self.pg.pg_data.as_deref().ok_or_else(|| {
            Error::Input(format!("no data directory for stanza '{}': set pg-data in [stanza.{}]", self.stanza, self.stanza))
                .with_hint(Hint::retry(Opt::PgData))
        })
    }
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let f = ConfigFile::parse(
            r#"
[stanza.demo]
pg-data = "/var/lib/postgresql/15/main"
pg-host = "/var/run/postgresql"
pg-port = 5432
pg-user = "postgres"

[[repo]]
location = "/var/lib/pgkeep"
compress = "zstd"
retention-full = 2
"#,
        )
        .unwrap();
        let s = Settings::resolve(&f, Some("demo"), StanzaOptions::default(), RepoOptions::default(), 1).unwrap();
        assert_eq!(s.pg.pg_port, Some(5432));
        assert_eq!(s.repos[0].compress, Some(Compress::Zstd));
    }

    #[test]
    fn sizes_take_binary_units_and_refuse_nonsense() {
        assert_eq!(parse_size("k", "4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("k", "512 MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("k", "1000").unwrap(), 1000);
        for bad in ["", "0", "GiB", "4 parsecs", "-1", "99999999999T"] {
            let e = parse_size("archive-push-queue-max", bad).unwrap_err().to_string();
            assert!(e.contains("archive-push-queue-max") && e.contains("not a size"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_named_on_one_line() {
        let e = ConfigFile::parse("[[repo]]\nlocation = \"/x\"\ncompres = \"zstd\"\n").unwrap_err();
        assert!(e.contains("compres") && e.contains("line 3") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_missing_stanza_is_explained() {
        let f = ConfigFile::parse("[stanza.a]\npg-port = 1\n[[repo]]\nlocation = \"/r\"\n").unwrap();
        let flags = StanzaOptions { pg_port: Some(2), ..Default::default() };
        let s = Settings::resolve(&f, Some("a"), flags, RepoOptions::default(), 1).unwrap();
        assert_eq!(s.pg.pg_port, Some(2));
        let e = Settings::resolve(&f, Some("b"), StanzaOptions::default(), RepoOptions::default(), 1).unwrap_err();
        assert!(e.to_string().contains("stanza 'b' is not in the config file"), "{e}");
    }
}
