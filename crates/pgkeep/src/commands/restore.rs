//! `restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use pgkeep_core::restore::{parse_timeline, target, ArchiveMode, RestoreOptions, Target};
use pgkeep_core::types::BackupLabel;
use pgkeep_core::Stanza;

use crate::cli::{Cli, Output, RestoreArgs};
use crate::progress::{bytes, Ticker};

pub async fn run(cli: &Cli, stanza: &Stanza, config: Option<&Path>, args: &RestoreArgs) -> Result<()> {
    let t = &args.target;
    let target = if let Some(s) = &t.target_time {
        Some(Target::Time(target::parse_time(s)?))
    } else if let Some(s) = &t.target_lsn {
        Some(Target::Lsn(s.parse()?))
    } else if let Some(x) = t.target_xid {
        Some(Target::Xid(x))
    } else if let Some(n) = &t.target_name {
        Some(Target::Name(n.clone()))
    } else if t.target_immediate {
        Some(Target::Immediate)
    } else {
        None
    };
    if args.standby && target.is_some() {
        bail!("--standby takes no recovery target: a standby replays to the end of the archive and then streams; leave the --target-* flags out (--target-timeline and --set are fine)");
    }
    if target.is_none() && args.target_exclusive {
        bail!("--target-exclusive needs a target (--target-time, --target-lsn, --target-xid or --target-name)");
    }
    let mut tablespace_map = Vec::new();
    for m in &args.tablespace_map {
        let Some((k, v)) = m.split_once('=') else { bail!("--tablespace-map {m}: write it as OID-or-NAME=DIR") };
        tablespace_map.push((k.to_owned(), PathBuf::from(v)));
    }
    let progress = Arc::new(pgkeep_core::progress::Progress::default());
    let opts = RestoreOptions {
        pg_data: cli.pg.pg_data.clone(),
        set: args.set.as_deref().map(BackupLabel::parse).transpose()?,
        target,
        exclusive: args.target_exclusive,
        action: args.target_action,
        timeline: args.target_timeline.as_deref().map(parse_timeline).transpose()?,
        force: args.force,
        delta: args.delta,
        tablespace_map,
        force_tablespaces: args.force_tablespaces,
        archive_mode: args.archive_mode,
        restore_command: restore_command(cli, stanza, config)?,
        standby: args.standby,
        primary_conninfo: args.primary_conninfo.clone(),
        progress: Some(progress.clone()),
        settings_elsewhere: false,
    };
    let started = std::time::Instant::now();
    let r = {
        let _ticker = Ticker::start("restore", progress);
        pgkeep_core::restore::run(stanza, &opts).await?
    };
    match cli.output {
        Output::Json => {
            let mut v = serde_json::to_value(&r)?;
            v["seconds"] = started.elapsed().as_secs_f64().into();
            super::print_json(&v)?
        }
        Output::Text => {
            let delta = if args.delta { format!(", {} already up to date, {} removed", r.unchanged, r.removed) } else { String::new() };
            println!(
                "restored backup {} from repo {} into {} ({} files{delta}, {}) in {:.1}s; start PostgreSQL there to {}",
                r.label,
                r.repo,
                r.pg_data.display(),
                r.files,
                bytes(r.bytes),
                started.elapsed().as_secs_f64(),
                if args.standby { "run it as a standby" } else { "recover" }
            );
            if r.archive_mode == ArchiveMode::Off && args.archive_mode.is_none() {
                eprintln!("pgkeep: the restored cluster will not archive WAL (archive_mode = off, as it is not the stanza's pg-data); pass --archive-mode preserve to keep archiving");
            }
        }
    }
    Ok(())
}

/// The `restore_command` that runs this same binary with the same config,
/// stanza and repository flags. Secrets are never written into it: give
/// them in the config file or the environment.
pub fn restore_command(cli: &Cli, stanza: &Stanza, config: Option<&Path>) -> Result<String> {
    let exe = std::env::current_exe()?;
    let mut words = vec![exe.display().to_string()];
    if let Some(c) = config {
        words.extend(["--config".to_owned(), c.display().to_string()]);
    }
    words.extend(["--stanza".to_owned(), stanza.name().to_owned()]);
    let r = &cli.repo_options;
    if cli.repo_number() != 1 && !r.is_empty() {
        words.extend(["--repo".to_owned(), cli.repo_number().to_string()]);
    }
    let flags = [
        ("--location", r.location.clone()),
        ("--endpoint", r.endpoint.clone()),
        ("--region", r.region.clone()),
        ("--path-style", r.path_style.map(|b| b.to_string())),
    ];
    for (flag, value) in flags {
        if let Some(v) = value {
            words.extend([flag.to_owned(), v]);
        }
    }
    let mut cmd: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    cmd.extend(["archive-get".into(), "%f".into(), "\"%p\"".into()]);
    Ok(cmd.join(" "))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:=+,@".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
