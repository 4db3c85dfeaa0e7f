//! `archive-push` and `archive-get`, synchronous or, with `archive-async`,
//! through a background worker (this same program, started with the same
//! arguments plus `--worker`, detached, logging into the spool).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Result;
use pgkeep_core::wal::{self, async_push, prefetch, spool::Spool, spool::Worker};
use pgkeep_core::Stanza;

pub async fn push(stanza: &Stanza, path: &Path, worker: bool) -> Result<()> {
    if worker {
        return Ok(async_push::worker(stanza, path).await?);
    }
    if !stanza.settings.archive.asynchronous {
        wal::push(stanza, path).await?;
        return Ok(());
    }
    let warnings = async_push::push(stanza, path, &|| start_worker(stanza, Worker::Push)).await?;
    // archive_command's stderr goes to PostgreSQL's log.
    for w in warnings {
        eprintln!("pgkeep: warning: {w}");
    }
    Ok(())
}

pub async fn get(stanza: &Stanza, name: &str, dest: &Path, worker: bool) -> Result<()> {
    if worker {
        return Ok(prefetch::worker(stanza).await?);
    }
    if !stanza.settings.archive.asynchronous {
        return Ok(wal::get(stanza, name, dest).await?);
    }
    Ok(prefetch::get(stanza, name, dest, &|| start_worker(stanza, Worker::Get)).await?)
}

/// Starts this program again, with the same arguments and `--worker`, in
/// its own process group (PostgreSQL's signals to its archiver and startup
/// process must not reach it), writing its output to the spool's log.
fn start_worker(stanza: &Stanza, worker: Worker) -> pgkeep_core::Result<()> {
    use std::os::unix::process::CommandExt;
    let spool = Spool::open(stanza)?;
    let log_path = spool.log_path(worker);
    let io = |e| pgkeep_core::Error::io(format!("cannot start the archive worker (log {})", log_path.display()))(e);
    let log = spool.open_log(worker).map_err(io)?;
    let exe = std::env::current_exe().map_err(io)?;
    let args = std::env::args_os().skip(1).chain(["--worker".into()]);
    Command::new(exe).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).process_group(0).spawn().map_err(io)?;
    Ok(())
}
