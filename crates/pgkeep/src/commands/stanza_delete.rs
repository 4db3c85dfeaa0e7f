//! `stanza-delete`.

use anyhow::Result;
use pgkeep_core::Stanza;

use crate::cli::{Cli, Output};

pub async fn run(cli: &Cli, stanza: &Stanza, force: bool) -> Result<()> {
    let reports = pgkeep_core::stanza::delete(stanza, cli.repo, force).await?;
    match cli.output {
        Output::Json => super::print_json_reports(cli, &reports, |r| serde_json::to_value(r).unwrap_or_default())?,
        Output::Text => {
            for r in &reports {
                println!("stanza '{}' deleted from repo {}: {} backups, {} objects", stanza.name(), r.repo, r.backups, r.objects);
            }
        }
    }
    Ok(())
}
