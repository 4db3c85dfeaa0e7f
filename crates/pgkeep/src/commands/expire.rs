//! `expire`, also run after every successful backup.

use anyhow::Result;
use pgkeep_core::expire::{ExpireOptions, ExpireReport};
use pgkeep_core::types::BackupLabel;
use pgkeep_core::Stanza;

use crate::cli::{Cli, Output};

/// Expires in the repository `--repo` names, else in every repository
/// (for `--set`: every repository holding that backup). A repository that
/// fails does not stop the others; the command then fails naming it.
pub async fn run(cli: &Cli, stanza: &Stanza, set: Option<&str>, with_dependents: bool, dry_run: bool) -> Result<()> {
    let set = set.map(|s| BackupLabel(s.to_owned()));
    let opts = ExpireOptions { repo: 0, set: set.clone(), with_dependents, dry_run };
    let r = pgkeep_core::expire::run_each(stanza, cli.repo, &opts).await?;
    match cli.output {
        Output::Text => r.done.iter().for_each(|r| print_text(r, set.is_none())),
        Output::Json => super::print_json_reports(cli, &r.done, json)?,
    }
    if !r.failed.is_empty() {
        anyhow::bail!("expire failed in {}", crate::hint::per_repo(&r.failed, stanza));
    }
    Ok(())
}

/// The report as JSON, for `expire` and for the expiry after a backup.
pub fn json(r: &ExpireReport) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or_default()
}

/// One line per backup removed, then one for the WAL; on stderr, as
/// stdout is kept for what scripts read.
pub fn print_text(r: &ExpireReport, by_retention: bool) {
    let verb = if r.dry_run { "would expire" } else { "expired" };
    if by_retention && !r.retention.is_set() {
        eprintln!(
            "pgkeep: no retention is configured for repo {} (retention-full, retention-diff, retention-window): nothing expired",
            r.repo
        );
        return;
    }
    for (label, kind) in &r.expired {
        eprintln!("pgkeep: {verb} {kind} backup {label} in repo {}", r.repo);
    }
    for label in &r.leftovers {
        eprintln!("pgkeep: {} the left-overs of interrupted backup {label}", if r.dry_run { "would remove" } else { "removed" });
    }
    let wal_verb = if r.dry_run { "would remove" } else { "removed" };
    match (&r.wal_from, r.wal_removed) {
        (Some(from), n) if n > 0 => eprintln!("pgkeep: {wal_verb} {n} WAL files before {from}, the oldest kept backup's start"),
        _ if r.expired.is_empty() => eprintln!("pgkeep: nothing to expire in repo {}: {} backups kept", r.repo, r.kept),
        _ => {}
    }
}
