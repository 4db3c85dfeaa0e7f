//! Flags and subcommands. Stanza and repository keys come from the same
//! option structs as the config file (`pgkeep_core::config`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use pgkeep_core::config::{RepoOptions, StanzaOptions};
use pgkeep_core::restore::{ArchiveMode, TargetAction};

/// PostgreSQL backup, WAL archiving and point-in-time restore.
#[derive(Debug, Parser)]
#[command(name = "pgkeep", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML).
    #[arg(long, global = true, env = "PGKEEP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stanza: the PostgreSQL cluster to work on.
    #[arg(long, global = true, env = "PGKEEP_STANZA")]
    pub stanza: Option<String>,
    /// Repository to work on, 1 to 4; the repository flags apply to it.
    /// Default: repo 1 for backup and restore drills, every repository for
    /// expire and verify.
    #[arg(long, global = true)]
    pub repo: Option<usize>,
    /// Parallel workers for backup and restore.
    #[arg(long, global = true)]
    pub jobs: Option<usize>,
    /// Seconds to wait for WAL to reach the archive (check, backup).
    #[arg(long, global = true)]
    pub archive_timeout: Option<u64>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub pg: StanzaOptions,
    #[command(flatten)]
    pub repo_options: RepoOptions,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The repository named by `--repo`, else repo 1.
    pub fn repo_number(&self) -> usize {
        self.repo.unwrap_or(1)
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Backup type flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackupTypeArg {
    /// Everything.
    Full,
    /// Changes since the last full backup.
    Diff,
    /// Changes since the last backup.
    Incr,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Initialise the stanza in every repository.
    StanzaCreate,
    /// After pg_upgrade: record the server's new system in every
    /// repository (or --repo N), beside the old one, whose backups stay
    /// listed and restorable.
    StanzaUpgrade {
        /// Record the server's system even when it does not look like the
        /// cluster pg_upgrade made from the stanza's (an older major, or a
        /// WAL position before the end of the stanza's archive: a cluster
        /// that replaced the old one by dump and restore).
        #[arg(long)]
        force: bool,
    },
    /// Delete the stanza, its backups and its WAL from every repository
    /// (or --repo N); refused while the cluster runs with archiving on.
    StanzaDelete {
        /// Delete even while the cluster seems to run and archive.
        #[arg(long)]
        force: bool,
    },
    /// Check configuration, connection and the WAL archive round trip.
    Check,
    /// Archive one WAL file (archive_command = 'pgkeep archive-push %p').
    ArchivePush {
        /// The file (%p).
        path: PathBuf,
        /// Internal: run as the background worker of asynchronous archiving.
        #[arg(long, hide = true)]
        worker: bool,
    },
    /// Fetch one WAL file (restore_command = 'pgkeep archive-get %f "%p"').
    ArchiveGet {
        /// WAL file name (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
        /// Internal: run as the prefetcher of asynchronous archiving.
        #[arg(long, hide = true)]
        worker: bool,
    },
    /// Take an online backup.
    Backup {
        /// full, diff or incr (default: incr when a full backup exists, else full).
        #[arg(long = "type", value_enum)]
        kind: Option<BackupTypeArg>,
    },
    /// Restore a backup so that starting PostgreSQL recovers to the target.
    Restore(RestoreArgs),
    /// Show backups and the WAL archive.
    Info,
    /// Apply retention or remove one backup.
    Expire {
        /// Backup to remove.
        #[arg(long)]
        set: Option<String>,
        /// With --set: also remove the backups built on it.
        #[arg(long, requires = "set")]
        with_dependents: bool,
        /// Show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run the in-pod agent: for pgkeep's Kubernetes operator, an HTTP API
    /// to start and follow backups, the repository's info, /healthz and
    /// /metrics (with --token-file); for CloudNativePG, its plugin
    /// interface (CNPG-I) on a Unix socket (with --plugin-socket).
    Agent {
        /// Address of the HTTP API.
        #[arg(long, default_value = "0.0.0.0:8432")]
        listen: std::net::SocketAddr,
        /// File holding the token the operator presents (in a pod, the
        /// Stanza's agent Secret, mounted); serves the HTTP API.
        #[arg(long, env = "PGKEEP_AGENT_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Serve CloudNativePG's plugin interface on this Unix socket (in
        /// a pod, /plugins/pgkeep.dev). The stanza of each request is the
        /// one the Cluster's plugin parameters name, read from the config
        /// file when the request comes.
        #[arg(long, env = "PGKEEP_PLUGIN_SOCKET")]
        plugin_socket: Option<PathBuf>,
        /// With --plugin-socket: read stanza NAME's config from
        /// DIR/NAME.toml instead of --config (each Stanza's ConfigMap,
        /// mounted there by the plugin; a config file has one set of
        /// repositories, and a recovery reads one stanza and archives into
        /// another).
        #[arg(long, env = "PGKEEP_PLUGIN_CONFIG_DIR")]
        plugin_config_dir: Option<PathBuf>,
        /// With --plugin-socket: the restore_command a CloudNativePG
        /// recovery gets (default: CloudNativePG's instance manager).
        #[arg(long, hide = true)]
        plugin_restore_command: Option<String>,
        /// With --plugin-socket: seconds a standby's WAL restore retries a
        /// failure other than "not in the archive" before answering it.
        #[arg(long, default_value_t = 30)]
        plugin_standby_restore_retry: u64,
        /// With --plugin-socket: where a recovered Cluster with
        /// spec.walStorage keeps pg_wal (CloudNativePG's WAL volume).
        #[arg(long, hide = true, default_value = pgkeep_agent::cnpgi::CNPG_WAL_DIR)]
        plugin_wal_dir: PathBuf,
    },
    /// Re-read and check stored data.
    Verify {
        /// Backup to verify.
        #[arg(long)]
        set: Option<String>,
        /// Instead: restore the backup (default the newest) into a scratch
        /// directory, start PostgreSQL on it, let it recover, run
        /// pg_amcheck on every database, then remove it all.
        #[arg(long)]
        restore: bool,
        /// With --restore: where to restore (empty or new; removed after).
        #[arg(long, requires = "restore")]
        scratch: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
#[group(id = "target", multiple = false)]
pub struct TargetArgs {
    /// Recover to this time (RFC 3339, or PostgreSQL's text form with a zone).
    #[arg(long)]
    pub target_time: Option<String>,
    /// Recover to this LSN.
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Recover to the commit of this transaction.
    #[arg(long)]
    pub target_xid: Option<u64>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long)]
    pub target_name: Option<String>,
    /// Recover only to the end of the backup.
    #[arg(long)]
    pub target_immediate: bool,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Backup to restore (default: the right one for the target).
    #[arg(long)]
    pub set: Option<String>,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub target_exclusive: bool,
    /// What PostgreSQL does at the target.
    #[arg(long, value_enum, default_value_t = TargetAction::Promote)]
    pub target_action: TargetAction,
    /// Timeline to recover along: latest, current or a number.
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// Rewrite only what differs in an existing data directory.
    #[arg(long)]
    pub delta: bool,
    /// Replace the contents of a non-empty data directory.
    #[arg(long)]
    pub force: bool,
    /// Restore a tablespace elsewhere: OID-or-NAME=DIR (repeatable).
    #[arg(long, value_name = "TABLESPACE=DIR")]
    pub tablespace_map: Vec<String>,
    /// With --force, also replace the contents of tablespaces restored to
    /// their original location outside the data directory.
    #[arg(long)]
    pub force_tablespaces: bool,
    /// Archiving in the restored cluster: off writes archive_mode = off,
    /// preserve keeps the source's settings (default: preserve when
    /// restoring into the stanza's own pg-data, off elsewhere).
    #[arg(long, value_enum)]
    pub archive_mode: Option<ArchiveMode>,
    /// Make the restored cluster a standby: it replays the archive, and
    /// streams from --primary-conninfo when given (standby.signal, no
    /// recovery target).
    #[arg(long)]
    pub standby: bool,
    /// With --standby: the primary_conninfo to write, like
    /// 'host=db1 port=5432 user=replicator'.
    #[arg(long, requires = "standby")]
    pub primary_conninfo: Option<String>,
}
