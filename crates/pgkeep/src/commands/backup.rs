//! `backup`.

use std::sync::Arc;

use anyhow::Result;
use pgkeep_core::backup::BackupOptions;
use pgkeep_core::repo::BackupType;
use pgkeep_core::Stanza;

use crate::cli::{BackupTypeArg, Cli, Output};
use crate::progress::{bytes, Ticker};

pub async fn run(cli: &Cli, stanza: &Stanza, kind: Option<BackupTypeArg>) -> Result<()> {
    let progress = Arc::new(pgkeep_core::progress::Progress::default());
    let opts = BackupOptions {
        repo: cli.repo,
        kind: kind.map(|k| match k {
            BackupTypeArg::Full => BackupType::Full,
            BackupTypeArg::Diff => BackupType::Diff,
            BackupTypeArg::Incr => BackupType::Incr,
        }),
        progress: Some(progress.clone()),
    };
    let started = std::time::Instant::now();
    let m = {
        let _ticker = Ticker::start("backup", progress);
        pgkeep_core::backup::run(stanza, &opts).await?
    };
    if opts.kind.is_some_and(|k| k != BackupType::Full) && m.kind == BackupType::Full {
        eprintln!("pgkeep: no full backup to build on yet, so this backup is a full one");
    }
    match cli.output {
        Output::Json => super::print_json(&serde_json::json!({
            "label": m.label, "type": m.kind, "start-lsn": m.start_lsn, "stop-lsn": m.stop_lsn,
            "size": m.size, "repo-size": m.repo_size, "files": m.files.len(), "seconds": started.elapsed().as_secs_f64(),
        }))?,
        Output::Text => {
            println!("{}", m.label);
            eprintln!(
                "backup {} done in {:.1}s: {} files, {} of database, {} stored, WAL {} to {}",
                m.label,
                started.elapsed().as_secs_f64(),
                m.files.len(),
                bytes(m.size),
                bytes(m.repo_size),
                m.start_wal,
                m.stop_wal
            );
        }
    }
    Ok(())
}
