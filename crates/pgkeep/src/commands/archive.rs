//! `archive-push` and `archive-get`.

use std::path::Path;

use anyhow::Result;
use pgkeep_core::Stanza;

pub async fn push(stanza: &Stanza, path: &Path) -> Result<()> {
    pgkeep_core::wal::push(stanza, path).await?;
    Ok(())
}

pub async fn get(stanza: &Stanza, name: &str, dest: &Path) -> Result<()> {
    pgkeep_core::wal::get(stanza, name, dest).await?;
    Ok(())
}
