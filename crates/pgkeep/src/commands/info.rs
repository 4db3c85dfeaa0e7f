//! `info`: every stanza of the config file, or the one named.

use anyhow::Result;
use pgkeep_core::config::ConfigFile;
use pgkeep_core::info::{BackupInfo, StanzaInfo};

use crate::cli::{Cli, Output};
use crate::progress::bytes;

pub async fn run(cli: &Cli, file: &ConfigFile) -> Result<()> {
    let names: Vec<Option<String>> = match &cli.stanza {
        Some(s) => vec![Some(s.clone())],
        None if file.stanza.len() > 1 => file.stanza.keys().cloned().map(Some).collect(),
        None => vec![None],
    };
    let mut all = Vec::new();
    for name in names {
        let stanza = super::resolve(cli, file, name.as_deref())?;
        all.push(pgkeep_core::info::collect(&stanza).await?);
    }
    match cli.output {
        Output::Json => super::print_json(&all),
        Output::Text => {
            all.iter().for_each(print_text);
            Ok(())
        }
    }
}

fn print_text(s: &StanzaInfo) {
    println!("stanza: {}", s.stanza);
    println!("    system-id {}, PostgreSQL {}", s.system_id, s.pg_version);
    match (&s.archive.min, &s.archive.max) {
        (Some(min), Some(max)) => println!("    wal archive min/max: {min} / {max}"),
        _ => println!("    wal archive: empty"),
    }
    // After stanza-upgrade: the systems before the current one, whose
    // backups stay restorable.
    for h in s.history.iter().filter(|h| !h.current) {
        let wal = match (&h.archive.min, &h.archive.max) {
            (Some(min), Some(max)) => format!("wal {min} / {max}"),
            _ => "no wal".into(),
        };
        println!("    earlier system {}: system-id {}, PostgreSQL {}, until stanza-upgrade; {wal}", h.id, h.system_id, h.pg_version);
    }
    for r in &s.repos {
        match &r.error {
            Some(e) => println!("    repo {} ({}): ERROR: {e}", r.repo, r.location),
            None => {
                let wal = match (&r.archive.min, &r.archive.max) {
                    (Some(min), Some(max)) => format!("wal {min} / {max}"),
                    _ => "no wal".into(),
                };
                println!("    repo {} ({}): {} backups, {} stored, {wal}", r.repo, r.location, r.backups, bytes(r.repo_size));
            }
        }
        if let Some(p) = &r.running {
            println!("        {} running: pid {} on {}, since {}", p.command, p.pid, p.host, p.since);
        }
        for label in &r.unfinished {
            let what = if r.running.as_ref().is_some_and(|p| p.command == "backup") { "unfinished (or running)" } else { "interrupted" };
            println!("        {what} backup {label}: no manifest yet");
        }
    }
    if s.backups.is_empty() {
        println!("    no backups");
    }
    for b in &s.backups {
        let kind = serde_json::to_value(b.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        println!();
        println!("    {kind} backup: {} (repo {}, from the {})", b.label, b.repo, b.from);
        if b.system_id != s.system_id {
            println!("        of earlier system {} (PostgreSQL {})", b.system_id, b.pg_version);
        }
        println!("        start/stop time: {} / {}", b.start_time, b.stop_time);
        println!("        start/stop lsn: {} / {}, wal {} / {}", b.start_lsn, b.stop_lsn, b.start_wal, b.stop_wal);
        println!("        database size: {}, stored: {}", bytes(b.size), bytes(b.repo_size));
        if let Some(p) = &b.prior {
            println!("        depends on: {p}");
        }
        println!("        page checksums: {}", page_checksums(b));
    }
}

/// The `page checksums:` line of a backup.
fn page_checksums(b: &BackupInfo) -> String {
    const SHOWN: usize = 10;
    if !b.page_checksums {
        return "not verified".into();
    }
    if b.checksum_errors == 0 {
        return "verified, no errors".into();
    }
    let plural = |n: u64| if n == 1 { "page" } else { "pages" };
    let mut files: Vec<String> =
        b.checksum_error_files.iter().take(SHOWN).map(|f| format!("{} ({} {})", f.path, f.pages, plural(f.pages))).collect();
    if b.checksum_error_files.len() > SHOWN {
        files.push(format!("and {} more files", b.checksum_error_files.len() - SHOWN));
    }
    format!("{} {} FAIL, in {}", b.checksum_errors, plural(b.checksum_errors), files.join(", "))
}
