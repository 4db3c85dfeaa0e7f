//! `stanza-create`, `stanza-upgrade`, `stanza-delete` and `check`.

use chrono::Utc;

use crate::error::{Error, Hint, Opt, Result};
use crate::pg::Pg;
use crate::repo::lock::StanzaLock;
use crate::repo::{keys, Repository, StanzaMeta, SystemRecord};
use crate::types::SystemId;
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
        history: Vec::new(),
    };
    let mut out = Vec::new();
    for number in 1..=stanza.settings.repos.len() {
        let pass = stanza.settings.passphrase(number)?;
        let (_, created) = Repository::create(&stanza.store(number)?, meta.clone(), number, pass.as_deref()).await?;
        out.push((number, created));
    }
    Ok(out)
}

/// What `stanza-upgrade` did in one repository.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UpgradeReport {
    /// The repository.
    pub repo: usize,
    /// The system recorded now; `None` when the server's system already
    /// was the stanza's current one (nothing changed).
    pub recorded: Option<SystemRecord>,
    /// The system the stanza held before (its current one when nothing
    /// changed).
    pub previous: SystemRecord,
}

/// `stanza-upgrade`, after `pg_upgrade`: records the server's system as the
/// stanza's current one in every repository (or repository `repo`),
/// beside the systems it held before, whose backups and WAL stay where
/// they are. From then on backups and WAL of the new system are taken,
/// into an archive of its own, and none of the old one.
///
/// In each repository with the stanza lock held (no backup or expire runs
/// meanwhile), `stanza.json` is read again and rewritten whole: an
/// interrupted upgrade leaves the old metadata or the new, never a mix.
/// A system the stanza held before is refused: the stanza never goes
/// back. So is, unless `force`, a server that does not look like the
/// cluster `pg_upgrade` made from the current system (see
/// [`not_upgraded_from`]): pointed at the wrong cluster, stanza-upgrade
/// would bind the stanza to it, and the real one could archive no more.
pub async fn upgrade(stanza: &Stanza, repo: Option<usize>, force: bool) -> Result<Vec<UpgradeReport>> {
    let pg = Pg::connect(&stanza.settings.pg).await?;
    let server = Server {
        system_id: pg.system_id().await?,
        pg_version: pg.version_num().await?,
        wal_segment_size: pg.wal_segment_size().await?,
        lsn: pg.current_lsn().await?,
        describe: pg.describe.clone(),
    };
    let server = &server;
    crate::each_of(stanza.repo_numbers(repo), true, |number| async move {
        // Judged first without the lock, so that a refusal (or nothing to
        // do) leaves the repository untouched; then again under it.
        let (repo, decided) = upgrade_decision(stanza, number, server, force).await?;
        if decided.recorded.is_none() {
            return Ok(decided);
        }
        let lock = StanzaLock::acquire(&repo, "stanza-upgrade").await?;
        let result = upgrade_one(stanza, number, server, force).await;
        let _ = lock.release().await;
        result
    })
    .await
    .map(|r| r.done)
}

/// What `stanza-upgrade` learns of the server.
struct Server {
    system_id: SystemId,
    pg_version: u32,
    wal_segment_size: u64,
    lsn: crate::types::Lsn,
    describe: String,
}

/// Why a server of system `new` is not the cluster `pg_upgrade` made from
/// `previous`, whose archive ends with a segment starting at
/// `archive_end` (pure). `pg_upgrade` never goes to an older major, and
/// it starts the new cluster's WAL after the old cluster's last
/// (`pg_resetwal -l` with the old cluster's next WAL file, in
/// `copy_xact_xlog_xid`, `src/bin/pg_upgrade/pg_upgrade.c`), so the new
/// cluster's position is past everything the old one archived.
pub fn not_upgraded_from(
    previous: &SystemRecord,
    new_version: u32,
    new_lsn: crate::types::Lsn,
    archive_end: Option<crate::types::Lsn>,
) -> Option<String> {
    if new_version / 10000 < previous.pg_major() {
        return Some(format!("it is PostgreSQL {}, older than the stanza's PostgreSQL {}", new_version / 10000, previous.pg_major()));
    }
    match archive_end {
        Some(end) if new_lsn < end => Some(format!(
            "its WAL position {new_lsn} is before the newest WAL the stanza holds of system {} (from {end}), and pg_upgrade starts the new cluster's WAL after the old one's",
            previous.system_id
        )),
        _ => None,
    }
}

/// [`upgrade`] in repository `number`, with the stanza lock held.
async fn upgrade_one(stanza: &Stanza, number: usize, server: &Server, force: bool) -> Result<UpgradeReport> {
    // Read again under the lock: another stanza-upgrade may have won.
    let (repo, decided) = upgrade_decision(stanza, number, server, force).await?;
    let Some(recorded) = &decided.recorded else { return Ok(decided) };
    let meta = repo.meta.upgraded(recorded.system_id, recorded.pg_version, recorded.wal_segment_size, recorded.since);
    repo.store().put(keys::STANZA, crate::repo::manifest::seal(&meta), false).await?;
    Ok(decided)
}

/// What [`upgrade`] would do in repository `number` as it is now: nothing
/// (`recorded` is `None`), record the server's system, or refuse.
async fn upgrade_decision(stanza: &Stanza, number: usize, server: &Server, force: bool) -> Result<(Repository, UpgradeReport)> {
    let (system_id, pg_version, wal_segment_size, describe) =
        (server.system_id, server.pg_version, server.wal_segment_size, &server.describe);
    let repo = stanza.open(number).await?;
    let previous = repo.meta.current();
    if previous.system_id == system_id {
        return Ok((repo, UpgradeReport { repo: number, recorded: None, previous }));
    }
    if let Some(old) = repo.meta.system(system_id) {
        return Err(Error::Refused(format!(
            "the server at {describe} is system {system_id} (PostgreSQL {}), which stanza '{}' in repo {number} held before system {} (PostgreSQL {}) replaced it; a stanza never goes back to an older system: check pg-host/pg-port/pg-data",
            old.pg_major(),
            stanza.name(),
            previous.system_id,
            previous.pg_major()
        )));
    }
    let archive_end = repo.list_segments().await?.iter().map(|(s, _)| crate::types::Lsn(s.number * previous.wal_segment_size)).max();
    if let Some(why) = not_upgraded_from(&previous, pg_version, server.lsn, archive_end).filter(|_| !force) {
        return Err(Error::Refused(format!(
            "the server at {describe} (system {system_id}) does not look like the cluster pg_upgrade made from stanza '{}''s system {} in repo {number}: {why}; check pg-host/pg-port, or record it anyway if it replaced the old cluster another way (dump and restore)",
            stanza.name(),
            previous.system_id
        ))
        .with_hint(Hint::retry(Opt::Force)));
    }
    let recorded = repo.meta.upgraded(system_id, pg_version, wal_segment_size, Utc::now()).current();
    Ok((repo, UpgradeReport { repo: number, recorded: Some(recorded), previous }))
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

/// What `stanza-delete` removed from one repository.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeleteReport {
    /// The repository.
    pub repo: usize,
    /// Backups whose manifests were removed.
    pub backups: usize,
    /// Objects removed, the stanza's metadata and lock included.
    pub objects: usize,
}

/// Deletes the stanza from repository `repo`, or from every repository.
/// Refuses while the cluster runs with archiving on (it would go on
/// archiving into a stanza that no longer exists), unless `force`.
///
/// In each repository, with the stanza lock held (no backup or expire
/// runs): the backups' manifests first, so that no backup looks complete
/// with files missing, then every other object, then `stanza.json`, then
/// the lock. Interrupted, the stanza is still there to delete again.
pub async fn delete(stanza: &Stanza, repo: Option<usize>, force: bool) -> Result<Vec<DeleteReport>> {
    if !force {
        not_archiving(stanza).await?;
    }
    crate::each_of(stanza.repo_numbers(repo), true, |number| delete_one(stanza, number)).await.map(|r| r.done)
}

/// [`delete`] in repository `number`, with the stanza lock held.
async fn delete_one(stanza: &Stanza, number: usize) -> Result<DeleteReport> {
    let repo = stanza.open(number).await?;
    let lock = StanzaLock::acquire(&repo, "stanza-delete").await?;
    match delete_objects(&repo).await {
        Ok((report, locks)) => {
            // The lock objects go last, after stanza.json.
            lock.forget().await;
            repo.store().delete_all(locks).await?;
            Ok(report)
        }
        Err(e) => {
            let _ = lock.release().await;
            Err(e)
        }
    }
}

/// Deletes the manifests, then every other object, then `stanza.json`;
/// returns the report and the lock objects, listed with the rest while
/// the lock is held (so they are all there is), left for the caller.
async fn delete_objects(repo: &Repository) -> Result<(DeleteReport, Vec<String>)> {
    let store = repo.store();
    let all: Vec<String> = store.list("").await?.into_iter().map(|l| l.key).collect();
    let lock_prefix = format!("{}/", keys::LOCK_DIR);
    let (locks, rest): (Vec<String>, Vec<String>) = all.into_iter().partition(|k| k.starts_with(&lock_prefix));
    let (manifests, rest): (Vec<String>, Vec<String>) = rest.into_iter().partition(|k| keys::is_manifest(k));
    let rest: Vec<String> = rest.into_iter().filter(|k| k != keys::STANZA).collect();
    let report = DeleteReport { repo: repo.number, backups: manifests.len(), objects: manifests.len() + rest.len() + 1 + locks.len() };
    store.delete_all(manifests).await?;
    store.delete_all(rest).await?;
    store.delete_all(vec![keys::STANZA.to_owned()]).await?;
    Ok((report, locks))
}

/// Refuses while the stanza's cluster answers with `archive_mode` on, or
/// seems to run (a `postmaster.pid` in pg-data) without answering: the
/// check [`delete`] makes unless forced.
pub async fn not_archiving(stanza: &Stanza) -> Result<()> {
    match Pg::connect(&stanza.settings.pg).await {
        Ok(pg) => {
            let mode = pg.setting("archive_mode").await?;
            if mode != "off" {
                return Err(Error::Refused(format!(
                    "the cluster at {} runs with archive_mode = {mode} and archives into stanza '{}': stop it or turn archiving off before deleting the stanza",
                    pg.describe,
                    stanza.name()
                ))
                .with_hint(Hint::retry(Opt::Force)));
            }
            Ok(())
        }
        Err(_) => match stanza.settings.pg.pg_data.as_deref().map(|d| d.join("postmaster.pid")) {
            Some(pid) if pid.exists() => Err(Error::Refused(format!(
                "{} exists but the cluster does not answer: it may run and archive into stanza '{}'; stop it before deleting the stanza",
                pid.display(),
                stanza.name()
            ))
            .with_hint(Hint::retry(Opt::Force))),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Lsn;

    #[test]
    fn only_a_cluster_that_can_be_the_upgrade_of_the_current_system_is_recorded_without_force() {
        let previous = SystemRecord { id: 1, system_id: SystemId(7), pg_version: 150014, wal_segment_size: 16 << 20, since: Utc::now() };
        let end = Some(Lsn(0x9000000));
        // What pg_upgrade makes: a newer (or the same) major, WAL after the old.
        assert_eq!(not_upgraded_from(&previous, 180001, Lsn(0xA000028), end), None);
        assert_eq!(not_upgraded_from(&previous, 150015, Lsn(0x9000000), end), None);
        assert_eq!(not_upgraded_from(&previous, 180001, Lsn(0x1000000), None), None, "nothing archived: nothing to compare");
        // What it cannot make: an older major, or WAL behind the archive.
        assert!(not_upgraded_from(&previous, 140010, Lsn(0xA000028), end).is_some_and(|w| w.contains("older")));
        assert!(not_upgraded_from(&previous, 180001, Lsn(0x1000000), end).is_some_and(|w| w.contains("0/1000000")));
    }
}
