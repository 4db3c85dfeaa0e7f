//! `agent`: the in-pod agent (crate `pgkeep-agent`) until SIGTERM: the
//! HTTP API for pgkeep's operator (`--token-file`), CloudNativePG's plugin
//! interface on a Unix socket (`--plugin-socket`), or both, sharing one
//! backup job at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use pgkeep_agent::cnpgi::{Plugin, PluginConfig, StanzaSource, CNPG_RESTORE_COMMAND};
use pgkeep_agent::jobs::{Jobs, Runner};
use pgkeep_agent::server::{Agent, AgentConfig};
use pgkeep_core::config::{ConfigFile, Settings};
use pgkeep_core::Stanza;

use crate::cli::{Cli, Command};

/// Runs the agent; `stanza` is the one resolved from the flags (required
/// by the HTTP API, which serves one stanza).
pub async fn run(cli: &Cli, stanza: Option<&Stanza>, config: Option<&Path>) -> Result<()> {
    let Command::Agent {
        listen,
        token_file,
        plugin_socket,
        plugin_config_dir,
        plugin_restore_command,
        plugin_standby_restore_retry,
        plugin_wal_dir,
    } = &cli.command
    else {
        unreachable!("agent::run runs the agent command")
    };
    if token_file.is_none() && plugin_socket.is_none() {
        bail!("the agent serves nothing: give --token-file (the HTTP API of pgkeep's operator), --plugin-socket (CloudNativePG's plugin interface), or both");
    }
    // A backup runs as a child `pgkeep backup` with this process's config
    // (see pgkeep_agent::jobs for why); the stanza is added per backup.
    let mut global = Vec::new();
    if let Some(c) = config {
        global.extend(["--config".to_owned(), c.display().to_string()]);
    }
    if let Some(j) = cli.jobs {
        global.extend(["--jobs".to_owned(), j.to_string()]);
    }
    let exe = std::env::current_exe().context("cannot find the pgkeep binary itself")?;
    // The connection flags given here hold for every backup (in a
    // CloudNativePG pod, its PGDATA and socket directory).
    let mut pg_flags = Vec::new();
    let p = &cli.pg;
    for (flag, value) in [
        ("--pg-data", p.pg_data.as_ref().map(|d| d.display().to_string())),
        ("--pg-host", p.pg_host.clone()),
        ("--pg-port", p.pg_port.map(|v| v.to_string())),
        ("--pg-user", p.pg_user.clone()),
    ] {
        if let Some(v) = value {
            pg_flags.push((flag.to_owned(), v));
        }
    }
    let base =
        Runner { exe, global, pg_data: String::new(), pg_host: String::new(), pg_port: 0, config_dir: None, standby_alone: None, pg_flags };
    let jobs = Arc::new(Jobs::default());
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut servers = tokio::task::JoinSet::new();

    if let Some(token_file) = token_file {
        let Some(stanza) = stanza else { bail!("the HTTP API serves one stanza: give --stanza") };
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("cannot read the agent token file {}; mount the Stanza's agent Secret there", token_file.display()))?
            .trim()
            .to_owned();
        if token.len() < 16 {
            bail!("the agent token in {} is shorter than 16 characters: use the Secret the operator makes", token_file.display());
        }
        let settings = stanza.settings.clone();
        let local = settings.pg.primary();
        let pg_data = settings.pg.pg_data.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let runner = Runner { pg_data, pg_host: local.host, pg_port: local.port, ..base.clone() }.for_stanza(&settings.stanza);
        let agent = Agent::with_jobs(AgentConfig { listen: *listen, token, settings, runner }, jobs.clone());
        eprintln!("pgkeep: agent of stanza {} listening on {listen}", stanza.name());
        let mut stop = stop_tx.subscribe();
        let listen = *listen;
        servers.spawn(async move {
            pgkeep_agent::server::serve(agent, async move {
                let _ = stop.recv().await;
            })
            .await
            .with_context(|| format!("the agent cannot serve on {listen}"))
        });
    }

    if let Some(socket) = plugin_socket {
        let stanzas = Arc::new(ConfigStanzas {
            overrides: super::Overrides::of(cli),
            config: config.map(Path::to_path_buf),
            dir: plugin_config_dir.clone(),
        });
        let cfg = PluginConfig {
            socket: socket.clone(),
            stanzas,
            // Each backup names its stanza (and its config file, with
            // --plugin-config-dir); on a standby it reads this server alone.
            runner: Runner { config_dir: plugin_config_dir.clone(), ..base.clone() },
            restore_command: plugin_restore_command.clone().unwrap_or_else(|| CNPG_RESTORE_COMMAND.to_owned()),
            instance: ["POD_NAME", "HOSTNAME"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
                .unwrap_or_else(|| "unknown".into()),
            standby_restore_retry: Duration::from_secs(*plugin_standby_restore_retry),
            wal_dir: plugin_wal_dir.clone(),
        };
        let plugin = Plugin::new(cfg, jobs.clone());
        eprintln!("pgkeep: CloudNativePG plugin {} serving on {}", pgkeep_cnpgi::PLUGIN_NAME, socket.display());
        let mut stop = stop_tx.subscribe();
        let socket = socket.clone();
        servers.spawn(async move {
            pgkeep_agent::cnpgi::serve(plugin, async move {
                let _ = stop.recv().await;
            })
            .await
            .with_context(|| format!("the agent cannot serve the plugin socket {}", socket.display()))
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let first = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        // A server that ends by itself failed: stop the other too.
        ended = servers.join_next() => ended,
    };
    let _ = stop_tx.send(());
    let mut result = match first {
        Some(r) => r.context("an agent server panicked")?,
        None => Ok(()),
    };
    // The servers finish the calls in flight, for a while: a recovery's
    // WAL restore that waits for an unreadable archive never ends.
    let drain = async {
        while let Some(r) = servers.join_next().await {
            let r = r.context("an agent server panicked")?;
            if result.is_ok() {
                result = r;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(20), drain).await.is_err() {
        eprintln!("pgkeep: agent stopped with calls still in flight");
    }
    result
}

/// The plugin's stanzas: the config file (or the stanza's own file in
/// `--plugin-config-dir`), read again at each request, with the command
/// line's flags over it.
struct ConfigStanzas {
    overrides: super::Overrides,
    config: Option<PathBuf>,
    /// `--plugin-config-dir`: one file per stanza.
    dir: Option<PathBuf>,
}

impl StanzaSource for ConfigStanzas {
    fn settings(&self, name: &str) -> pgkeep_core::Result<Settings> {
        let file = match (&self.dir, &self.config) {
            (Some(dir), _) => {
                if !pgkeep_cnpgi::cluster::valid_stanza_name(name) {
                    return Err(pgkeep_core::Error::Input(format!("'{name}' is not a stanza name")));
                }
                let path = dir.join(format!("{name}.toml"));
                if !path.exists() {
                    return Err(pgkeep_core::Error::Input(format!(
                        "stanza '{name}' has no config in {} (no {name}.toml): create the pgkeep Stanza '{name}' in the Cluster's namespace",
                        dir.display()
                    )));
                }
                ConfigFile::load(&path, true)?
            }
            (None, Some(p)) => ConfigFile::load(p, true)?,
            (None, None) => ConfigFile::load(Path::new(super::DEFAULT_CONFIG), false)?,
        };
        self.overrides.resolve(&file, Some(name))
    }
}
