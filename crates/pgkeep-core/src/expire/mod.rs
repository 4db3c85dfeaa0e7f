//! `expire`: removes the backups retention no longer keeps (see [`plan`]),
//! or one backup by label, then the WAL no kept backup needs.
//!
//! Crash safety: a backup's manifest is deleted before its objects, and
//! dependents before the backups they build on, so at every moment each
//! listed backup is whole and has its chain. A killed expire leaves
//! directories without a manifest or checkpoint; the next expire or backup
//! removes them. WAL goes last, and only WAL before the oldest kept
//! backup's start.

pub mod plan;

use chrono::Utc;

pub use crate::config::{parse_window, Retention};
use crate::error::Result;
use crate::repo::lock::StanzaLock;
use crate::repo::{BackupType, Manifest, Repository};
use crate::types::{BackupLabel, WalFileName, WalSegment};
use crate::Stanza;
pub use plan::{by_label, by_policy, ExpirePlan};

/// Options of `expire`.
#[derive(Debug, Clone, Default)]
pub struct ExpireOptions {
    /// Repository (1-based; 0 means 1).
    pub repo: usize,
    /// Remove this backup instead of applying retention.
    pub set: Option<BackupLabel>,
    /// With `set`: remove the backups built on it too.
    pub with_dependents: bool,
    /// Decide, report, remove nothing.
    pub dry_run: bool,
}

/// What `expire` did (or, with `dry_run`, would do).
#[derive(Debug, Clone)]
pub struct ExpireReport {
    /// Repository.
    pub repo: usize,
    /// The policy applied (unset: nothing expires by retention).
    pub retention: Retention,
    /// Backups removed, dependents first.
    pub expired: Vec<(BackupLabel, BackupType)>,
    /// Backups kept.
    pub kept: usize,
    /// WAL files removed.
    pub wal_removed: usize,
    /// The first WAL segment kept (the oldest kept backup's start).
    pub wal_from: Option<String>,
    /// Left-overs of interrupted runs removed (directories without a
    /// manifest or checkpoint).
    pub leftovers: Vec<BackupLabel>,
    /// Nothing was removed: a dry run.
    pub dry_run: bool,
}

/// As JSON: `repo`, `dry-run`, `expired` (`label`, `type`), `kept`,
/// `wal-removed`, `wal-from`, `leftovers-removed`.
impl serde::Serialize for ExpireReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Expired<'a> {
            label: &'a BackupLabel,
            #[serde(rename = "type")]
            kind: BackupType,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Out<'a> {
            repo: usize,
            dry_run: bool,
            expired: Vec<Expired<'a>>,
            kept: usize,
            wal_removed: usize,
            wal_from: &'a Option<String>,
            leftovers_removed: &'a [BackupLabel],
        }
        Out {
            repo: self.repo,
            dry_run: self.dry_run,
            expired: self.expired.iter().map(|(label, kind)| Expired { label, kind: *kind }).collect(),
            kept: self.kept,
            wal_removed: self.wal_removed,
            wal_from: &self.wal_from,
            leftovers_removed: &self.leftovers,
        }
        .serialize(s)
    }
}

/// Applies retention (or removes `opts.set`) in one repository.
pub async fn run(stanza: &Stanza, opts: &ExpireOptions) -> Result<ExpireReport> {
    let number = opts.repo.max(1);
    let repo = stanza.open(number).await?;
    let retention = stanza.settings.repos[number - 1].retention(number)?;
    // A dry run changes nothing, the lock included.
    if opts.dry_run {
        return locked(&repo, retention, opts).await;
    }
    let lock = StanzaLock::acquire(&repo, "expire").await?;
    let result = locked(&repo, retention, opts).await;
    // A lock that cannot be released now is taken over once this
    // process has exited; the result is what matters.
    let _ = lock.release().await;
    result
}

/// The expiry itself, with the stanza lock held (or, for a dry run,
/// without it).
async fn locked(repo: &Repository, retention: Retention, opts: &ExpireOptions) -> Result<ExpireReport> {
    let number = repo.number;
    let backups = repo.backups().await?;
    // Under the lock no backup runs: what has no manifest is abandoned. A
    // dry run holds no lock: while a backup runs it lists no leftovers.
    let running = opts.dry_run && crate::repo::lock::holder(repo).await?.is_some();
    let unfinished = match running {
        true => Vec::new(),
        false => crate::repo::partial::unfinished(repo, &backups).await?,
    };
    let plan = match &opts.set {
        Some(label) => by_label(&backups, label, opts.with_dependents)?,
        None => by_policy(&backups, &retention, Utc::now()),
    };
    let (wal_doomed, wal_from) = doomed_wal(repo, &backups, &plan, retention.is_set() || opts.set.is_some()).await?;
    let leftovers: Vec<BackupLabel> = unfinished.into_iter().filter(|u| u.checkpoint.is_none()).map(|u| u.label).collect();
    let report = ExpireReport {
        repo: number,
        retention,
        expired: plan
            .expire
            .iter()
            .map(|l| (l.clone(), backups.iter().find(|m| &m.label == l).map_or(BackupType::Full, |m| m.kind)))
            .collect(),
        kept: plan.keep.len(),
        wal_removed: wal_doomed.len(),
        wal_from,
        leftovers,
        dry_run: opts.dry_run,
    };
    if opts.dry_run {
        return Ok(report);
    }
    for label in &plan.expire {
        repo.remove_backup(label).await?;
    }
    for label in &report.leftovers {
        repo.remove_backup_objects(label).await?;
    }
    repo.store().delete_all(wal_doomed).await?;
    Ok(report)
}

/// The archived WAL no kept backup needs, in the archive of each system
/// of the stanza's history, and the first segment kept in the current
/// system's. Within a system: what lies before its oldest kept backup's
/// start (when `prune`: retention is set or one backup is removed). With
/// no backup kept at all, nothing goes: it may be all that is left to
/// investigate. A system replaced by `stanza-upgrade` whose backups are
/// all gone while a later system's are kept loses its whole archive: no
/// backup is left to replay it onto.
async fn doomed_wal(repo: &Repository, backups: &[Manifest], plan: &ExpirePlan, prune: bool) -> Result<(Vec<String>, Option<String>)> {
    let kept: Vec<&Manifest> = backups.iter().filter(|m| plan.keep.contains(&m.label)).collect();
    let systems = repo.meta.systems();
    let current = repo.meta.current();
    let mut doomed = Vec::new();
    let mut wal_from = None;
    for system in &systems {
        let seg = system.wal_segment_size;
        let from = kept
            .iter()
            .filter(|m| m.system_id == system.system_id)
            .filter_map(|m| WalSegment::parse(&m.start_wal, seg))
            .min_by_key(|s| s.number);
        if system.id == current.id {
            wal_from = from.map(|s| s.name(seg));
        }
        let later_kept = kept.iter().any(|m| systems.iter().any(|s| s.id > system.id && s.system_id == m.system_id));
        let before = match from {
            Some(from) if prune => from.number,
            None if prune && later_kept => u64::MAX,
            _ => continue,
        };
        let archive = repo.for_system(system.system_id, "the stanza's history")?;
        // Timeline history files stay while the system has a backup.
        let gone = |name: &str| before == u64::MAX || segment_of(name, seg).is_some_and(|s| s.number < before);
        doomed.extend(archive.list_wal().await?.into_iter().filter(|w| gone(&w.name)).map(|w| w.key));
    }
    Ok((doomed, wal_from))
}

/// The segment a segment, partial segment or backup history file belongs
/// to; `None` for timeline history files (always kept).
fn segment_of(name: &str, seg_size: u64) -> Option<WalSegment> {
    match WalFileName::parse(name)? {
        WalFileName::History(_) => None,
        other => WalSegment::parse(&other.as_str()[..24], seg_size),
    }
}

/// Expires in repository `named`, else in every repository (for `set`:
/// every repository holding that backup, or the first when none does, so
/// that it says the backup does not exist); a repository that fails does
/// not stop the others.
pub async fn run_each(stanza: &Stanza, named: Option<usize>, opts: &ExpireOptions) -> Result<crate::PerRepo<ExpireReport>> {
    let mut numbers = stanza.repo_numbers(named);
    if let (Some(label), None) = (&opts.set, named) {
        let mut found = Vec::new();
        for &n in &numbers {
            let has = async { Ok::<_, crate::Error>(stanza.open(n).await?.backups().await?.iter().any(|m| &m.label == label)) };
            if has.await.unwrap_or(false) {
                found.push(n);
            }
        }
        numbers = if found.is_empty() { numbers.into_iter().take(1).collect() } else { found };
    }
    crate::each_of(numbers, named.is_some(), |number| {
        let opts = ExpireOptions { repo: number, ..opts.clone() };
        async move { run(stanza, &opts).await }
    })
    .await
}

/// Expires `repo` by its retention after a backup; `None` when no
/// retention is configured.
pub async fn after_backup(stanza: &Stanza, repo: usize) -> Result<Option<ExpireReport>> {
    let number = repo.max(1);
    if !stanza.settings.repos[number - 1].retention(number)?.is_set() {
        return Ok(None);
    }
    run(stanza, &ExpireOptions { repo: number, ..Default::default() }).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_files_belong_to_their_segment_and_history_files_to_none() {
        let seg = 16 << 20;
        assert_eq!(segment_of("000000010000000000000003", seg).map(|s| s.number), Some(3));
        assert_eq!(segment_of("000000020000000100000003.partial", seg).map(|s| s.number), Some(256 + 3));
        assert_eq!(segment_of("000000010000000000000003.00000028.backup", seg).map(|s| s.number), Some(3));
        assert_eq!(segment_of("00000002.history", seg), None);
    }
}
