//! `stanza-create` and `check`.

use chrono::Utc;

use crate::error::Result;
use crate::pg::Pg;
use crate::repo::{Repository, StanzaMeta};
use crate::Stanza;

/// What `stanza-create` did in each repository: (repo number, created now).
pub async fn create(stanza: &Stanza) -> Result<Vec<(usize, bool)>> {
    let pg = Pg::connect(&stanza.settings.pg).await?;
    let meta = StanzaMeta {
        stanza: stanza.name().to_owned(),
        system_id: pg.system_id().await?,
        pg_version: pg.version_num().await?,
        wal_segment_size: pg.wal_segment_size().await?,
        created: Utc::now(),
        cipher: None,
    };
    let mut out = Vec::new();
    for number in 1..=stanza.settings.repos.len() {
        let pass = stanza.settings.passphrase(number)?;
        let (_, created) = Repository::create(&stanza.store(number)?, meta.clone(), number, pass.as_deref()).await?;
        out.push((number, created));
    }
    Ok(out)
}

/// The result of `check`.
#[derive(Debug)]
pub struct CheckReport {
    /// The segment switched to and seen in every repository.
    pub segment: String,
    /// Repositories checked.
    pub repos: usize,
}

/// Checks configuration, connection, that every repository holds this
/// cluster's stanza, and the archive round trip: forces a WAL switch and
/// waits for that segment to reach every repository.
pub async fn check(stanza: &Stanza) -> Result<CheckReport> {
    let repos = stanza.open_all().await?;
    let pg = Pg::connect(&stanza.settings.pg).await?;
    let id = pg.system_id().await?;
    for r in &repos {
        r.check_system_id(id, &format!("the server at {}", pg.describe))?;
    }
    if pg.setting("archive_mode").await? == "off" {
        return Err(crate::Error::Input(format!(
            "archive_mode is off on the server at {}; set archive_mode = on and archive_command = 'pgkeep --stanza {} archive-push %p', then restart it",
            pg.describe,
            stanza.name()
        )));
    }
    let segment = pg.switch_wal().await?;
    for r in &repos {
        crate::wal::wait_archived(r, &segment, stanza.settings.archive_timeout).await?;
    }
    Ok(CheckReport { segment, repos: repos.len() })
}
