//! `pgkeep-cnpgi-client`: calls a CNPG-I plugin's WAL service on its Unix
//! socket the way CloudNativePG's instance manager does for PostgreSQL's
//! `archive_command` and `restore_command` (`manager wal-archive` and
//! `manager wal-restore`), for tests and for debugging a plugin by hand:
//!
//! ```text
//! pgkeep-cnpgi-client --socket /plugins/pgkeep.dev --cluster cluster.json wal-archive %p
//! pgkeep-cnpgi-client --socket /plugins/pgkeep.dev --cluster cluster.json wal-restore %f %p
//! ```
//!
//! Like the instance manager, it runs in the data directory (or
//! `--pg-data`), sends absolute paths, asks for `check_empty_wal_archive`
//! while `.check-empty-wal-archive` exists there (the instance manager
//! removes that file only later, once its archiving condition is true: the
//! plugin must remove it itself after the first success), and exits 1 on
//! any failure: "not in the archive" and "the archive cannot be read" look
//! the same to PostgreSQL, which is why the plugin itself must never
//! answer the second while a cluster is being recovered.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgkeep_cnpgi::proto::wal::wal_client::WalClient;
use pgkeep_cnpgi::proto::wal::wal_restore_request::Mode;
use pgkeep_cnpgi::proto::wal::{WalArchiveRequest, WalRestoreRequest};

#[derive(Parser)]
#[command(version, about = "Call a CNPG-I plugin's WAL service as CloudNativePG's instance manager does")]
struct Args {
    /// The plugin's Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// The Cluster, as JSON (the instance manager sends the one it caches).
    #[arg(long)]
    cluster: PathBuf,
    /// The data directory (default: the current directory, where
    /// PostgreSQL runs its commands).
    #[arg(long, default_value = ".")]
    pg_data: PathBuf,
    #[command(subcommand)]
    command: Call,
}

#[derive(Subcommand)]
enum Call {
    /// archive_command: archive the file at PATH (`%p`).
    WalArchive {
        /// The file.
        path: PathBuf,
    },
    /// restore_command: write archived file NAME (`%f`) to DEST (`%p`).
    WalRestore {
        /// For pg_rewind.
        #[arg(long)]
        rewind: bool,
        /// The file's name.
        name: String,
        /// Where to write it.
        dest: PathBuf,
    },
}

/// The file CloudNativePG leaves in a new data directory until its first
/// WAL file is archived.
const CHECK_EMPTY: &str = ".check-empty-wal-archive";

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(call(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgkeep-cnpgi-client: {e}");
            ExitCode::from(1)
        }
    }
}

async fn call(args: &Args) -> Result<(), String> {
    let cluster = std::fs::read(&args.cluster).map_err(|e| format!("cannot read {}: {e}", args.cluster.display()))?;
    let channel =
        pgkeep_cnpgi::connect_unix(&args.socket).await.map_err(|e| format!("cannot connect to {}: {e}", args.socket.display()))?;
    let mut wal = WalClient::new(channel);
    // The plugin runs elsewhere: it gets absolute paths.
    let pg_data = std::path::absolute(&args.pg_data).map_err(|e| format!("cannot resolve {}: {e}", args.pg_data.display()))?;
    let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { pg_data.join(p) };
    match &args.command {
        Call::WalArchive { path } => {
            let check_empty = pg_data.join(CHECK_EMPTY).exists();
            let req = WalArchiveRequest {
                cluster_definition: cluster,
                source_file_name: abs(path).display().to_string(),
                parameters: Default::default(),
                check_empty_wal_archive: Some(check_empty),
            };
            wal.archive(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        }
        Call::WalRestore { rewind, name, dest } => {
            let req = WalRestoreRequest {
                cluster_definition: cluster,
                source_wal_name: name.clone(),
                destination_file_name: abs(dest).display().to_string(),
                parameters: Default::default(),
                mode: if *rewind { Mode::Rewind } else { Mode::Recovery } as i32,
            };
            wal.restore(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        }
    }
    Ok(())
}
