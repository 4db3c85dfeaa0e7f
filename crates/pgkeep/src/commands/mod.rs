//! One module per verb. Each takes the parsed flags and the resolved
//! stanza, calls the engine and prints the result.

mod agent;
mod archive;
mod backup;
mod check;
mod expire;
mod info;
mod restore;
mod stanza_create;
mod stanza_delete;
mod stanza_upgrade;
mod verify;

use std::path::PathBuf;

use anyhow::Result;
use pgkeep_core::config::{ConfigFile, Settings};
use pgkeep_core::Stanza;

use crate::cli::{Cli, Command};

const DEFAULT_CONFIG: &str = "/etc/pgkeep/pgkeep.toml";

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let (file, config_path) = load_file(&cli)?;
    if let Command::Info = &cli.command {
        return info::run(&cli, &file).await;
    }
    // A CloudNativePG plugin alone serves whichever stanza each request
    // names: none is resolved now.
    if let Command::Agent { token_file: None, plugin_socket: Some(_), .. } = &cli.command {
        return agent::run(&cli, None, config_path.as_deref()).await;
    }
    let stanza = resolve(&cli, &file, cli.stanza.as_deref())?;
    match &cli.command {
        Command::StanzaCreate => stanza_create::run(&stanza).await,
        Command::StanzaUpgrade { force } => stanza_upgrade::run(&cli, &stanza, *force).await,
        Command::StanzaDelete { force } => stanza_delete::run(&cli, &stanza, *force).await,
        Command::Check => check::run(&stanza).await,
        Command::ArchivePush { path, worker } => {
            // archive_command runs in the data directory too: a cluster of
            // an older system of the stanza (started again after a
            // copy-mode pg_upgrade) is refused whatever it archives.
            let sending = pgkeep_core::pg::data_dir_system_id(std::path::Path::new("."));
            archive::push(&stanza.serving_system(sending), path, *worker).await
        }
        Command::ArchiveGet { name, dest, worker } => {
            // PostgreSQL runs restore_command in the data directory: its
            // pg_control says which system of the stanza's history asks
            // (a restored backup taken before pg_upgrade replays the old
            // system's WAL).
            let asking = pgkeep_core::pg::data_dir_system_id(std::path::Path::new("."));
            archive::get(&stanza.serving_system(asking), name, dest, *worker).await
        }
        Command::Backup { kind } => backup::run(&cli, &stanza, *kind).await,
        Command::Restore(args) => restore::run(&cli, &stanza, config_path.as_deref(), args).await,
        Command::Expire { set, with_dependents, dry_run } => expire::run(&cli, &stanza, set.as_deref(), *with_dependents, *dry_run).await,
        Command::Verify { set, restore: false, .. } => verify::run(&cli, &stanza, set.as_deref()).await,
        Command::Verify { set, restore: true, scratch } => {
            let restore_command = restore::restore_command(&cli, &stanza, config_path.as_deref())?;
            verify::drill(&cli, &stanza, set.as_deref(), scratch.clone(), restore_command).await
        }
        Command::Agent { .. } => agent::run(&cli, Some(&stanza), config_path.as_deref()).await,
        Command::Info => unreachable!("handled above"),
    }
}

/// Reads the config file: the one named by --config/PGKEEP_CONFIG (which
/// must exist), else the default path if it exists.
fn load_file(cli: &Cli) -> Result<(ConfigFile, Option<PathBuf>)> {
    match &cli.config {
        Some(p) => {
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            Ok((ConfigFile::load(&abs, true)?, Some(abs)))
        }
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG);
            let exists = p.exists();
            Ok((ConfigFile::load(&p, false)?, exists.then_some(p)))
        }
    }
}

/// Resolves one stanza's settings from the file and the flags.
fn resolve(cli: &Cli, file: &ConfigFile, stanza: Option<&str>) -> Result<Stanza> {
    Ok(Stanza::new(Overrides::of(cli).resolve(file, stanza)?))
}

/// What the command line sets over a config file's stanza: kept apart
/// from the [`Cli`] so that the agent can resolve stanzas again later.
#[derive(Clone)]
struct Overrides {
    pg: pgkeep_core::config::StanzaOptions,
    repo_options: pgkeep_core::config::RepoOptions,
    repo: usize,
    jobs: Option<usize>,
    archive_timeout: Option<u64>,
}

impl Overrides {
    fn of(cli: &Cli) -> Overrides {
        Overrides {
            pg: cli.pg.clone(),
            repo_options: cli.repo_options.clone(),
            repo: cli.repo_number(),
            jobs: cli.jobs,
            archive_timeout: cli.archive_timeout,
        }
    }

    /// The settings of `stanza` in `file` with these flags over them.
    fn resolve(&self, file: &ConfigFile, stanza: Option<&str>) -> pgkeep_core::Result<Settings> {
        let mut settings = Settings::resolve(file, stanza, self.pg.clone(), self.repo_options.clone(), self.repo)?;
        if let Some(j) = self.jobs {
            settings.jobs = j.max(1);
        }
        if let Some(t) = self.archive_timeout {
            settings.archive_timeout = t;
        }
        Ok(settings)
    }
}

/// Prints per-repository reports as JSON: the one report when `--repo`
/// named a repository, else an array with one per repository.
fn print_json_reports<T>(cli: &Cli, reports: &[T], json: impl Fn(&T) -> serde_json::Value) -> Result<()> {
    match (cli.repo, reports) {
        (Some(_), [one]) => print_json(&json(one)),
        _ => print_json(&reports.iter().map(json).collect::<Vec<_>>()),
    }
}

/// Prints a value as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
