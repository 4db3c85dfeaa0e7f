//! `check`.

use anyhow::Result;
use pgkeep_core::Stanza;

pub async fn run(stanza: &Stanza) -> Result<()> {
    let r = pgkeep_core::stanza::check(stanza).await?;
    println!("check ok: WAL segment {} reached {} repositor{}", r.segment, r.repos, if r.repos == 1 { "y" } else { "ies" });
    Ok(())
}
