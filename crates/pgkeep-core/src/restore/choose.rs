//! Step 1 of a restore: choose the backup that reaches the target (and
//! its chain), in the first repository that can, and check that the
//! archive holds the WAL it needs.

use std::path::{Path, PathBuf};

use super::destination::{check_delta_target, check_destination};
use super::*;
use crate::error::{Error, Hint, Operation, Opt, Result};
use crate::repo::{ArchivedWal, Manifest, Repository};
use crate::types::{TimelineHistory, TimelineId, WalSegment};
use crate::Stanza;

/// The decided restore, before any file is written.
pub(super) struct Plan {
    pub(super) repo: Repository,
    /// The backup to restore, then the backups it depends on, newest first.
    pub(super) chain: Vec<Manifest>,
    pub(super) pg_data: PathBuf,
    /// (link name under pg_tblspc, destination directory).
    pub(super) tablespaces: Vec<(u32, PathBuf)>,
    /// The `recovery_target_timeline` to write (see
    /// [`target::choose_with_timeline`]).
    pub(super) timeline: Option<String>,
    /// The destination is the stanza's own pg-data (as configured, not
    /// as a flag overrides it).
    pub(super) in_place: bool,
}

pub(super) async fn plan(stanza: &Stanza, opts: &RestoreOptions) -> Result<Plan> {
    let target = opts.target.clone().unwrap_or(Target::End);
    if opts.standby && target != Target::End {
        return Err(Error::Input("a standby replays to the end of the archive and then streams: it takes no recovery target".into()));
    }
    if opts.primary_conninfo.is_some() && !opts.standby {
        return Err(Error::Input("primary_conninfo is only written for a standby".into()));
    }
    let pg_data = match &opts.pg_data {
        Some(p) => p.clone(),
        None => stanza.settings.pg_data()?.to_path_buf(),
    };
    if !pg_data.is_absolute() {
        return Err(Error::Input(format!("the data directory {} is not an absolute path", pg_data.display())));
    }
    check_destination(&pg_data, opts.force || opts.delta, "", Hint::retry(Opt::Force))?;
    let in_place = match (&opts.pg_data, &stanza.settings.configured_pg_data) {
        (None, _) => true,
        (Some(asked), Some(own)) => same_path(asked, own),
        (Some(_), None) => false,
    };
    let mut first_err = None;
    for number in 1..=stanza.settings.repos.len() {
        let attempt = async {
            let (repo, backups) = of_one_system(stanza.open(number).await?, opts.set.as_ref()).await?;
            let listed = repo.list_wal().await?;
            let path = recovery_path(&repo, opts.timeline.as_deref(), &listed).await?;
            let selection = selection_target(&repo, &backups, &target).await?;
            let (m, timeline) =
                target::choose_with_timeline(&backups, &selection, opts.set.as_ref(), opts.timeline.as_deref(), path.as_ref())?;
            let m = m.clone();
            check_archive(&repo, &m, &target, repo.segments_of(listed))?;
            let chain = backup_chain(&backups, m, repo.number)?;
            Ok::<_, Error>((repo, chain, timeline))
        };
        match attempt.await {
            Ok((repo, chain, timeline)) => {
                if opts.delta {
                    check_delta_target(&pg_data, &chain[0])?;
                }
                let tablespaces = map_tablespaces(&chain[0], &opts.tablespace_map)?;
                for (oid, dir) in &tablespaces {
                    let ts = chain[0].tablespaces.iter().find(|t| t.oid == *oid);
                    let mapped = opts.tablespace_map.iter().any(|(k, _)| ts.is_some_and(|t| *k == t.oid.to_string() || *k == t.name));
                    let may_empty = mapped || dir.starts_with(&pg_data) || opts.force_tablespaces;
                    check_destination(
                        dir,
                        opts.delta || (opts.force && may_empty),
                        &format!(", tablespace {oid}'s own location, which a forced restore leaves alone unless asked to replace it too"),
                        Hint::any_of([Hint::retry(Opt::ForceTablespaces), Hint::retry(Opt::TablespaceMap)]),
                    )?;
                }
                if opts.delta {
                    // A delta restore changes a directory that holds data:
                    // every list it needs is read through first, so that
                    // a damaged one stops it before it changes anything.
                    super::chain::check(&repo, &chain).await?;
                }
                return Ok(Plan { repo, chain, pg_data, tablespaces, timeline, in_place });
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("at least one repository"))
}

/// The backups of one system of the stanza's history, and the repository
/// handle that reads that system's WAL: the system of backup `set` when
/// it is named, else the stanza's current one. Systems are never mixed:
/// WAL positions and timelines of one mean nothing to another.
pub(super) async fn of_one_system(repo: Repository, set: Option<&crate::types::BackupLabel>) -> Result<(Repository, Vec<Manifest>)> {
    let all = repo.backups().await?;
    let system = set.and_then(|label| all.iter().find(|m| &m.label == label)).map_or(repo.system.system_id, |m| m.system_id);
    let repo = repo.for_system(system, "the backup")?;
    let older = all.iter().filter(|m| m.system_id != system).count();
    let backups: Vec<Manifest> = all.into_iter().filter(|m| m.system_id == system).collect();
    if backups.is_empty() && older > 0 {
        return Err(Error::Input(format!(
            "repo {} holds no backup of stanza '{}''s current system {} (PostgreSQL {}) yet, only {older} of the systems before stanza-upgrade; take a backup, or name one of those to restore it (with its own PostgreSQL binaries)",
            repo.number,
            repo.meta.stanza,
            system,
            repo.system.pg_major()
        ))
        .with_hint(Hint::any_of([Hint::run(Operation::Backup), Hint::retry(Opt::Set)])));
    }
    Ok((repo, backups))
}

/// `m` and the backups it depends on, newest first.
pub(super) fn backup_chain(backups: &[Manifest], m: Manifest, repo: usize) -> Result<Vec<Manifest>> {
    let mut chain = vec![m];
    while let Some(prior) = chain.last().and_then(|m| m.prior.clone()) {
        let found = backups.iter().find(|b| b.label == prior).ok_or_else(|| {
            Error::Corrupt(format!(
                "backup {} depends on backup {prior}, which is missing from repo {repo}; restore another backup",
                chain[0].label
            ))
        })?;
        if chain.len() > 10_000 {
            return Err(Error::Corrupt(format!("the chain of backup {} loops", chain[0].label)));
        }
        chain.push(found.clone());
    }
    Ok(chain)
}

/// The history of the timeline recovery will follow: the one asked for by
/// number, else the newest one in the archive; `None` for `current` (the
/// backup's own timeline), or when the newest timeline's history file is
/// not archived.
pub(super) async fn recovery_path(repo: &Repository, asked: Option<&str>, listed: &[ArchivedWal]) -> Result<Option<TimelineHistory>> {
    let timeline = match asked {
        Some("current") => return Ok(None),
        Some(n) if n != "latest" => {
            let number = match n.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => n.parse().ok(),
            };
            let tli = TimelineId(number.ok_or_else(|| Error::Input(format!("target timeline '{n}' is not a timeline number")))?);
            return match repo.timeline_history(tli).await? {
                Some(h) => Ok(Some(h)),
                None => Err(Error::Input(format!("timeline {tli} has no history file in repo {}", repo.number))
                    .with_hint(Hint::any_of([Hint::retry(Opt::TargetTimeline), Hint::run(Operation::Info)]))),
            };
        }
        _ => listed.iter().filter_map(|w| u32::from_str_radix(w.name.get(..8)?, 16).ok()).max().map_or(TimelineId(1), TimelineId),
    };
    repo.timeline_history(timeline).await
}

/// The target that decides which backup can reach it: a restore point is
/// looked up in the archived WAL and stands for its LSN.
pub(super) async fn selection_target(repo: &Repository, backups: &[Manifest], target: &Target) -> Result<Target> {
    let Target::Name(name) = target else { return Ok(target.clone()) };
    let Some(oldest) = backups.first() else { return Ok(target.clone()) };
    match crate::wal::find_restore_point(repo, name, oldest.start_lsn).await? {
        Some(lsn) => Ok(Target::Lsn(lsn)),
        None => Err(Error::Input(format!(
            "restore point '{name}' is not in the archived WAL of repo {} after the first backup; check the name, archive the WAL that holds it (SELECT pg_switch_wal()) or name the backup",
            repo.number
        ))
        .with_hint(Hint::retry(Opt::Set))),
    }
}

/// The archive must hold the WAL that makes the backup consistent, and
/// reach the target: say so now rather than let recovery fail later.
pub(super) fn check_archive(repo: &Repository, m: &Manifest, target: &Target, segments: Vec<(WalSegment, ArchivedWal)>) -> Result<()> {
    let seg_size = repo.system.wal_segment_size;
    let (first, last) = (WalSegment::parse(&m.start_wal, seg_size), WalSegment::parse(&m.stop_wal, seg_size));
    if let (Some(first), Some(last)) = (first, last) {
        if let Some(missing) = Repository::first_missing(&segments, first, last) {
            return Err(Error::Corrupt(format!(
                "backup {} needs WAL segment {}, which is missing from repo {}; restore another backup",
                m.label,
                missing.name(seg_size),
                repo.number
            )));
        }
    }
    let Some((last, wal)) = segments.iter().max_by_key(|(s, _)| (s.timeline, s.number)) else {
        return Err(Error::Input(format!("repo {} holds no archived WAL; check archive_command", repo.number)));
    };
    let end_lsn = last.end_lsn(seg_size);
    match target {
        Target::Lsn(l) if *l >= end_lsn => Err(Error::Input(format!(
            "target LSN {l} is after the end of the archive ({end_lsn}, segment {}); archive more WAL (SELECT pg_switch_wal()) or choose an earlier target",
            wal.name
        ))),
        Target::Time(t) if *t > wal.modified => Err(Error::Input(format!(
            "target time {} is after the end of the archive (segment {} archived at {}); archive more WAL (SELECT pg_switch_wal()) or choose an earlier target",
            target::format_time(t),
            wal.name,
            target::format_time(&wal.modified)
        ))),
        _ => Ok(()),
    }
}

pub(super) fn map_tablespaces(m: &Manifest, map: &[(String, PathBuf)]) -> Result<Vec<(u32, PathBuf)>> {
    for (key, _) in map {
        if !m.tablespaces.iter().any(|t| &t.oid.to_string() == key || &t.name == key) {
            return Err(Error::Input(format!("tablespace '{key}' of the tablespace map: backup {} has no such tablespace", m.label)));
        }
    }
    Ok(m.tablespaces
        .iter()
        .map(|t| {
            let dest = map.iter().find(|(k, _)| k == &t.oid.to_string() || k == &t.name).map(|(_, d)| d.clone());
            (t.oid, dest.unwrap_or_else(|| PathBuf::from(&t.location)))
        })
        .collect())
}

/// Whether two paths name the same directory (the same once resolved, or
/// written the same when they do not exist).
pub(super) fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
