//! `stanza-upgrade`.

use anyhow::Result;
use pgkeep_core::Stanza;

use crate::cli::{Cli, Output};

pub async fn run(cli: &Cli, stanza: &Stanza, force: bool) -> Result<()> {
    let reports = pgkeep_core::stanza::upgrade(stanza, cli.repo, force).await?;
    match cli.output {
        Output::Json => super::print_json_reports(cli, &reports, |r| serde_json::to_value(r).unwrap_or_default())?,
        Output::Text => {
            for r in &reports {
                let was = format!("system {} (PostgreSQL {})", r.previous.system_id, r.previous.pg_major());
                match &r.recorded {
                    Some(now) => println!(
                        "stanza '{}' upgraded in repo {}: {was} -> system {} (PostgreSQL {}); the next backup is full",
                        stanza.name(),
                        r.repo,
                        now.system_id,
                        now.pg_major()
                    ),
                    None => println!("stanza '{}' in repo {} already holds the server's {was}", stanza.name(), r.repo),
                }
            }
        }
    }
    Ok(())
}
