//! `verify`: the findings on stdout, one per line; a failure is one line
//! on stderr and a non-zero exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use pgkeep_core::drill::DrillOptions;
use pgkeep_core::types::BackupLabel;
use pgkeep_core::verify::{VerifyOptions, VerifyReport};
use pgkeep_core::Stanza;

use crate::cli::{Cli, Output};
use crate::progress::{bytes, Ticker};

/// Verifies the repository `--repo` names, else every repository (for
/// `--set`: every repository holding that backup).
pub async fn run(cli: &Cli, stanza: &Stanza, set: Option<&str>) -> Result<()> {
    let set = set.map(|s| BackupLabel(s.to_owned()));
    let r = stanza
        .each_repo(cli.repo, |repo| {
            let set = set.clone();
            async move {
                let progress = Arc::new(pgkeep_core::progress::Progress::default());
                let opts = VerifyOptions { repo, set, progress: Some(progress.clone()) };
                let r = {
                    let _ticker = Ticker::start("verify", progress);
                    pgkeep_core::verify::run(stanza, &opts).await
                };
                if let (Ok(r), Output::Text) = (&r, cli.output) {
                    print_text(r);
                }
                r
            }
        })
        .await?;
    // --set names a backup of some repositories only: "not found" in the
    // others is no failure, unless it is not found anywhere.
    let (missing, failed): (Vec<_>, Vec<_>) =
        r.failed.into_iter().partition(|(_, e)| set.is_some() && matches!(e.kind(), pgkeep_core::Error::NotFound(_)));
    let reports = r.done;
    if reports.is_empty() && failed.is_empty() {
        if let Some((_, e)) = missing.into_iter().next() {
            return Err(e.into());
        }
    }
    let failed: Vec<String> = failed.iter().map(|f| crate::hint::per_repo(std::slice::from_ref(f), stanza)).collect();
    if cli.output == Output::Json {
        super::print_json_reports(cli, &reports, json)?;
    }
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| r.problems() > 0)
        .map(|r| format!("{} problem{} in repo {}", r.problems(), if r.problems() == 1 { "" } else { "s" }, r.repo))
        .chain(failed.iter().map(|f| format!("cannot verify {f}")))
        .collect();
    if !bad.is_empty() {
        anyhow::bail!("verify found {}; restore from another backup or repository until they are fixed", bad.join(", "));
    }
    Ok(())
}

/// `verify --restore`: a restore drill.
pub async fn drill(cli: &Cli, stanza: &Stanza, set: Option<&str>, scratch: Option<PathBuf>, restore_command: String) -> Result<()> {
    let opts = DrillOptions {
        repo: cli.repo_number(),
        set: set.map(|s| BackupLabel(s.to_owned())),
        scratch,
        restore_command,
        timeout: Duration::from_secs(stanza.settings.archive_timeout.max(600)),
    };
    let r = pgkeep_core::drill::run(stanza, &opts).await?;
    match cli.output {
        Output::Json => super::print_json(&serde_json::json!({
            "label": r.label, "repo": r.repo, "ok": r.ok(), "restore-seconds": r.restore_secs,
            "recovery-seconds": r.recovery_secs, "databases": r.databases, "amcheck": r.amcheck,
        }))?,
        Output::Text => {
            print!("{}", r.amcheck);
            println!(
                "backup {} of repo {}: restored in {:.1}s, recovered and promoted in {:.1}s, pg_amcheck on {} databases: {}",
                r.label,
                r.repo,
                r.restore_secs,
                r.recovery_secs,
                r.databases,
                if r.ok() { "clean" } else { "PROBLEMS (above)" }
            );
        }
    }
    if !r.ok() {
        anyhow::bail!("backup {} restores, but pg_amcheck found damage in it; restore from an earlier backup", r.label);
    }
    Ok(())
}

fn json(r: &VerifyReport) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or_default()
}

fn print_text(r: &VerifyReport) {
    for b in &r.backups {
        for p in &b.problems {
            println!("{p}");
        }
    }
    for p in &r.wal_problems {
        println!("{p}");
    }
    for p in &r.lock_problems {
        println!("{p}");
    }
    for g in &r.gaps {
        println!("WAL segments {} to {} are missing from repo {} (timeline {})", g.from, g.to, r.repo, g.timeline.0);
    }
    let stored: u64 = r.backups.iter().map(|b| b.bytes).sum();
    println!(
        "verified repo {}: {} backup{} ({} files, {} stored), {} WAL files: {}",
        r.repo,
        r.backups.len(),
        if r.backups.len() == 1 { "" } else { "s" },
        r.backups.iter().map(|b| b.files).sum::<usize>(),
        bytes(stored),
        r.wal_files,
        match r.problems() {
            0 => "all good".to_owned(),
            n => format!("{n} problem{}", if n == 1 { "" } else { "s" }),
        }
    );
}
