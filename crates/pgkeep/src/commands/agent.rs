//! `agent`: the in-pod agent (crate `pgkeep-agent`) until SIGTERM.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, Result};
use pgkeep_agent::jobs::Runner;
use pgkeep_agent::server::{Agent, AgentConfig};
use pgkeep_core::Stanza;

use crate::cli::Cli;

pub async fn run(cli: &Cli, stanza: &Stanza, config: Option<&Path>, listen: SocketAddr, token_file: &Path) -> Result<()> {
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read the agent token file {}; mount the Stanza's agent Secret there", token_file.display()))?
        .trim()
        .to_owned();
    if token.len() < 16 {
        anyhow::bail!("the agent token in {} is shorter than 16 characters: use the Secret the operator makes", token_file.display());
    }
    let settings = stanza.settings.clone();
    // A backup runs as a child `pgkeep backup` with this process's config
    // and stanza (see pgkeep_agent::jobs for why).
    let mut global = Vec::new();
    if let Some(c) = config {
        global.extend(["--config".to_owned(), c.display().to_string()]);
    }
    global.extend(["--stanza".to_owned(), settings.stanza.clone()]);
    if let Some(j) = cli.jobs {
        global.extend(["--jobs".to_owned(), j.to_string()]);
    }
    let local = settings.pg.primary();
    let runner = Runner {
        exe: std::env::current_exe().context("cannot find the pgkeep binary itself")?,
        global,
        pg_data: settings.pg.pg_data.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        pg_host: local.host,
        pg_port: local.port,
    };
    let agent = Agent::new(AgentConfig { listen, token, settings, runner });
    eprintln!("pgkeep: agent of stanza {} listening on {listen}", stanza.name());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    pgkeep_agent::server::serve(agent, shutdown).await.with_context(|| format!("the agent cannot serve on {listen}"))?;
    Ok(())
}
