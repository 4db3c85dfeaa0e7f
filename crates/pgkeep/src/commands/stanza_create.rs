//! `stanza-create`.

use anyhow::Result;
use pgkeep_core::Stanza;

pub async fn run(stanza: &Stanza) -> Result<()> {
    for (number, created) in pgkeep_core::stanza::create(stanza).await? {
        let state = if created { "created" } else { "already exists for this cluster" };
        println!("stanza '{}' {state} in repo {number}", stanza.name());
    }
    Ok(())
}
