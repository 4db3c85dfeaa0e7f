//! `backup`.

use std::sync::Arc;

use anyhow::Result;
use pgkeep_core::backup::BackupOptions;
use pgkeep_core::repo::{BackupType, FileEntry};
use pgkeep_core::Stanza;

use crate::cli::{BackupTypeArg, Cli, Output};
use crate::progress::{bytes, Ticker};

pub async fn run(cli: &Cli, stanza: &Stanza, kind: Option<BackupTypeArg>) -> Result<()> {
    let progress = Arc::new(pgkeep_core::progress::Progress::default());
    let opts = BackupOptions {
        repo: cli.repo_number(),
        kind: kind.map(|k| match k {
            BackupTypeArg::Full => BackupType::Full,
            BackupTypeArg::Diff => BackupType::Diff,
            BackupTypeArg::Incr => BackupType::Incr,
        }),
        progress: Some(progress.clone()),
    };
    let result = {
        let _ticker = Ticker::start("backup", progress);
        pgkeep_core::backup::run_then_expire(stanza, &opts).await?
    };
    let done = &result.backup;
    let m = &done.manifest;
    for label in &done.removed {
        eprintln!("pgkeep: removed the unfinished backup {label} left by an interrupted run (not resumable as a {} backup)", m.kind);
    }
    if let Some((files, size)) = done.resumed {
        eprintln!("pgkeep: resumed the interrupted backup {}: kept {files} files ({}) it had stored", m.label, bytes(size));
    }
    if let Some(why) = &done.passed_over {
        eprintln!("pgkeep: NOTICE: backup {} read the primary because {why}", m.label);
    } else if m.from == pgkeep_core::repo::ServerRole::Standby {
        eprintln!("pgkeep: backup {} read the standby", m.label);
    }
    if let Some(why) = &done.full_because {
        eprintln!("pgkeep: NOTICE: backup {} is a full backup because {why}", m.label);
    }
    for f in &done.checksum_failures {
        eprintln!("{}", checksum_warning(f));
    }
    // Retention runs after every successful backup; if it fails, the
    // backup still stands.
    if let Some(e) = &result.expire_failed {
        eprintln!(
            "pgkeep: WARNING: backup {} is complete but expire failed: {}; run `pgkeep --stanza {} expire` again",
            m.label,
            crate::hint::core_line(e, Some(stanza.name())),
            stanza.name()
        );
    }
    match cli.output {
        Output::Json => super::print_json(&result)?,
        Output::Text => {
            if let Some(r) = &result.expired {
                super::expire::print_text(r, true);
            }
            println!("{}", m.label);
            let unread = match done.unread {
                (0, _) => String::new(),
                (n, size) => format!(" ({n} of them, {}, unchanged since the prior and not read)", bytes(size)),
            };
            eprintln!(
                "backup {} done in {:.1}s: {} files{unread}, {} of database, {} stored, WAL {} to {}",
                m.label,
                done.seconds,
                m.file_count(),
                bytes(m.size),
                bytes(m.repo_size),
                m.start_wal,
                m.stop_wal
            );
        }
    }
    Ok(())
}

/// The warning for a file with pages that fail their checksum: one line,
/// naming the file and (up to ten of) its pages.
fn checksum_warning(f: &FileEntry) -> String {
    const SHOWN: usize = 10;
    let total = f.checksum_error_pages();
    let mut pages: Vec<String> = f.checksum_errors.iter().take(SHOWN).map(u32::to_string).collect();
    let hidden = total - pages.len() as u64;
    if hidden > 0 {
        pages.push(format!("and {hidden} more"));
    }
    let what = if total == 1 { "1 page fails its checksum (page".to_owned() } else { format!("{total} pages fail their checksums (pages") };
    format!("pgkeep: WARNING: {}: {what} {}); the backup is kept", f.path, pages.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_line_names_the_file_and_its_pages() {
        let mut f: FileEntry = serde_json::from_value(serde_json::json!({
            "path": "base/5/16384", "size": 8192, "mode": 384, "mtime": 0, "checksum": "", "key": null, "repo-size": 0,
            "checksum-errors": [3]
        }))
        .unwrap();
        assert_eq!(checksum_warning(&f), "pgkeep: WARNING: base/5/16384: 1 page fails its checksum (page 3); the backup is kept");
        f.checksum_errors = (0..12).collect();
        f.checksum_errors_unlisted = 5;
        assert_eq!(
            checksum_warning(&f),
            "pgkeep: WARNING: base/5/16384: 17 pages fail their checksums (pages 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, and 7 more); the backup is kept"
        );
    }
}
