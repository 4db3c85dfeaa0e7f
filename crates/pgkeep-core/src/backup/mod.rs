//! Online physical backups.
//!
//! The sequence, all on one connection: `pg_backup_start` (fast
//! checkpoint), copy the files in parallel as a walk of the data directory
//! finds them ([`plan::Planner`]; read, checksum, compress, upload, each
//! file streamed in bounded memory, and the file list written as they
//! are stored: see `copy.rs`), then
//! `pg_backup_stop` (which waits until PostgreSQL has archived the WAL the
//! backup needs), check that every segment from the start to the stop LSN
//! is in the repository, and only then write the manifest. A backup that
//! fails before that point is not a backup: its objects are removed. A
//! killed one leaves objects no manifest points to and a checkpoint, from
//! which the next backup resumes (see [`resume`]).

pub mod basis;
pub mod bundle;
mod copy;
pub mod plan;
pub mod resume;
pub mod source;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Timelike, Utc};

use crate::error::{Error, Result};
use crate::progress::{Progress, Step};
use crate::repo::lock::StanzaLock;
use crate::repo::{BackupType, ChecksumErrorFile, FileEntry, Manifest, Repository, ServerRole, Tablespace};
use crate::types::{BackupLabel, Lsn, TimelineHistory, WalSegment};
use crate::Stanza;
use basis::ClusterNow;
pub use plan::PlannedFile;
use resume::{Checkpoint, Checkpointer};
use source::Source;

/// A finished backup.
#[derive(Debug)]
pub struct Backup {
    /// Its manifest, as written.
    pub manifest: Manifest,
    /// When it took over an interrupted attempt: the files kept from it
    /// and their bytes.
    pub resumed: Option<(usize, u64)>,
    /// The files left unread because they are unchanged since the prior
    /// backup, and their bytes.
    pub unread: (usize, u64),
    /// Unfinished backups left by killed runs that could not be resumed
    /// and were removed.
    pub removed: Vec<BackupLabel>,
    /// Why the backup is full although another type was asked for (or
    /// implied by asking for none while a full backup exists).
    pub full_because: Option<String>,
    /// With `backup-standby = prefer`, why the backup read the primary.
    pub passed_over: Option<String>,
    /// How long it took, from connecting to the manifest written.
    pub seconds: f64,
    /// The files with pages that failed their page checksum.
    pub checksum_failures: Vec<FileEntry>,
}

/// Options of a backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Repository to back up to (1-based; 0 means 1).
    pub repo: usize,
    /// Requested type; `None`: incremental when a full backup exists, else
    /// full. A diff or incr without a full backup to build on becomes full.
    pub kind: Option<BackupType>,
    /// Where to count progress.
    pub progress: Option<Arc<Progress>>,
}

/// The type of the next backup and the backup it builds on (pure).
pub fn choose_prior(backups: &[Manifest], requested: Option<BackupType>) -> (BackupType, Option<&Manifest>) {
    let last_full = backups.iter().rev().find(|m| m.kind == BackupType::Full);
    let Some(full) = last_full else { return (BackupType::Full, None) };
    match requested.unwrap_or(BackupType::Incr) {
        BackupType::Full => (BackupType::Full, None),
        BackupType::Diff => (BackupType::Diff, Some(full)),
        // The newest backup of the newest full's chain.
        BackupType::Incr => (BackupType::Incr, backups.iter().rev().find(|m| m.label.0.starts_with(&full.label.0))),
    }
}

/// Takes a backup; returns it once its manifest is written. An abandoned
/// attempt of the same type on the same prior is resumed (see [`resume`]).
pub async fn run(stanza: &Stanza, opts: &BackupOptions) -> Result<Backup> {
    let started = std::time::Instant::now();
    let number = opts.repo.max(1);
    let repo = stanza.open(number).await?;
    let source = source::choose(&stanza.settings, &repo).await?;
    let page_checksums = source.pg.data_checksums().await?;
    let lock = StanzaLock::acquire(&repo, "backup").await?;
    let result = locked(stanza, opts, &repo, &source, page_checksums).await;
    // A lock that cannot be released now is taken over once this
    // process has exited; the result is what matters.
    let _ = lock.release().await;
    result.map(|b| Backup { seconds: started.elapsed().as_secs_f64(), ..b })
}

/// A backup and the retention applied after it.
#[derive(Debug)]
pub struct BackupThenExpire {
    /// The backup.
    pub backup: Backup,
    /// What retention removed; `None` when no retention is configured, or
    /// when it failed.
    pub expired: Option<crate::expire::ExpireReport>,
    /// Why retention failed; the backup stands all the same.
    pub expire_failed: Option<Error>,
}

/// As JSON (what `backup --output json` prints and the operator stores):
/// `label`, `type`, `start-time`, `stop-time` (RFC 3339), `start-lsn`, `stop-lsn`, `size`, `repo-size`, `files`,
/// `seconds`, `page-checksums`, `checksum-errors`, `resumed-files`,
/// `resumed-bytes`, `full-because`, `from`, `standby-passed-over`,
/// `system-id`, `pg-version`, `start-wal`, `stop-wal`, `expire` (the
/// retention's report) and `expire-failed` (why it failed).
impl serde::Serialize for BackupThenExpire {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Out<'a> {
            label: &'a BackupLabel,
            #[serde(rename = "type")]
            kind: BackupType,
            start_time: String,
            stop_time: String,
            start_lsn: crate::types::Lsn,
            stop_lsn: crate::types::Lsn,
            start_wal: &'a str,
            stop_wal: &'a str,
            size: u64,
            repo_size: u64,
            files: usize,
            seconds: f64,
            page_checksums: bool,
            checksum_errors: u64,
            resumed_files: Option<usize>,
            resumed_bytes: Option<u64>,
            unread_files: usize,
            unread_bytes: u64,
            full_because: &'a Option<String>,
            from: ServerRole,
            standby_passed_over: &'a Option<String>,
            system_id: String,
            pg_version: String,
            expire: &'a Option<crate::expire::ExpireReport>,
            expire_failed: Option<String>,
        }
        let (b, m) = (&self.backup, &self.backup.manifest);
        Out {
            label: &m.label,
            kind: m.kind,
            start_time: crate::types::rfc3339(m.start_time),
            stop_time: crate::types::rfc3339(m.stop_time),
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            start_wal: &m.start_wal,
            stop_wal: &m.stop_wal,
            size: m.size,
            repo_size: m.repo_size,
            files: m.file_count() as usize,
            seconds: b.seconds,
            page_checksums: m.page_checksums,
            checksum_errors: m.checksum_error_pages(),
            resumed_files: b.resumed.map(|r| r.0),
            resumed_bytes: b.resumed.map(|r| r.1),
            unread_files: b.unread.0,
            unread_bytes: b.unread.1,
            full_because: &b.full_because,
            from: m.from,
            standby_passed_over: &b.passed_over,
            system_id: m.system_id.to_string(),
            pg_version: (m.pg_version / 10000).to_string(),
            expire: &self.expired,
            expire_failed: self.expire_failed.as_ref().map(|e| crate::error::OneLine(e).to_string()),
        }
        .serialize(s)
    }
}

/// Takes a backup, then applies the repository's retention, as every
/// front end does after a backup. Retention that fails does not undo the
/// backup: the failure is reported beside it.
pub async fn run_then_expire(stanza: &Stanza, opts: &BackupOptions) -> Result<BackupThenExpire> {
    let backup = run(stanza, opts).await?;
    let (expired, expire_failed) = match crate::expire::after_backup(stanza, opts.repo).await {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e)),
    };
    Ok(BackupThenExpire { backup, expired, expire_failed })
}

/// The backup itself, with the stanza lock held.
async fn locked(stanza: &Stanza, opts: &BackupOptions, repo: &Repository, source: &Source, page_checksums: bool) -> Result<Backup> {
    let pg = &source.pg;
    let number = repo.number;
    let pg_data = source.data.clone();
    let repo_opts = &stanza.settings.repos[number - 1];
    let compress = repo_opts.compress.unwrap_or_default();

    let backups = repo.backups().await?;
    let now = cluster_now(source, repo, page_checksums).await?;
    let (kind, prior) = choose_prior(&backups, opts.kind);
    let (kind, prior, full_because) = match prior.map(|p| (p, basis::prior_unusable(p, &now))) {
        Some((_, Some(why))) => (BackupType::Full, None, Some(why)),
        Some((p, None)) => (kind, Some(p), None),
        None if opts.kind.is_some_and(|k| k != BackupType::Full) => {
            (kind, None, Some("there is no full backup to build on yet".to_owned()))
        }
        None => (kind, None, None),
    };
    let prior_label = prior.map(|p| p.label.clone());
    let unfinished = crate::repo::partial::unfinished(repo, &backups).await?;
    let taken = resume::choose(&unfinished, kind, prior_label.as_ref(), compress, repo.system.system_id).cloned();
    let mut removed = Vec::new();
    for u in unfinished.into_iter().filter(|u| taken.as_ref().is_none_or(|t| t.label != u.label)) {
        repo.remove_backup_objects(&u.label).await?;
        removed.push(u.label);
    }
    let label = match &taken {
        Some(t) => t.label.clone(),
        None => new_label(repo, kind, prior).await?,
    };
    let start_time = Utc::now();
    // Until the plan is checked against it, a taken-over checkpoint keeps
    // its files and its (earlier, so stricter) start.
    let first = match &taken {
        Some(t) => Checkpoint::new(label.clone(), kind, prior_label.clone(), compress, t.start_time, t.files.clone()),
        None => Checkpoint::new(label.clone(), kind, prior_label.clone(), compress, start_time, Vec::new()),
    }
    .of_system(repo.system.system_id);
    let first = Checkpoint { chunks: taken.as_ref().map_or(0, |t| t.chunks), ..first };
    let checkpointer = Checkpointer::start(repo, first).await?;
    // The prior was judged on the timeline seen before the start; a
    // promotion in between would void that judgement.
    let progress = opts.progress.clone().unwrap_or_default();
    progress.step(Step::Starting);
    let started = pg.backup_start(&format!("pgkeep backup {label}")).await.and_then(|s| match s.timeline == now.timeline {
        true => Ok(s),
        false => Err(Error::Refused(format!(
            "the {} at {} was on timeline {} before the backup started and its backup starts on timeline {}; run the backup again{}",
            source.role,
            pg.describe,
            now.timeline,
            s.timeline,
            match source.role {
                ServerRole::Standby => " once the standby has made a restartpoint on its new timeline",
                ServerRole::Primary => "",
            }
        ))),
    });
    let start = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = pg.backup_stop().await;
            if taken.is_none() {
                let _ = repo.remove_backup_objects(&label).await;
            }
            return Err(e);
        }
    };
    let tablespaces: Vec<Tablespace> =
        pg.tablespaces().await?.into_iter().map(|(oid, name, location)| Tablespace { oid, name, location }).collect();

    let saver = checkpointer.keep_saving();
    let copied = async {
        let reuse = match &taken {
            Some(t) => Some(take_over(repo, t, &pg_data, prior, start_time).await?),
            None => None,
        };
        if let Some((_, kept)) = &reuse {
            checkpointer.keep(kept.clone(), start_time);
        }
        progress.step(Step::Copying);
        let copy = copy::Copy {
            repo: repo.clone(),
            sink: copy::Sink::new(repo, &label, compress, repo_opts.compress_level),
            pg_data: pg_data.clone(),
            prior: prior.cloned(),
            reuse: reuse.map(|(r, _)| r),
            began: start_time,
            jobs: stanza.settings.jobs,
            // Pages are verified against the backup's start: see pg::checksum.
            verify: page_checksums.then_some(start.lsn),
            checkpointer: checkpointer.clone(),
            progress: progress.clone(),
        };
        tokio::task::spawn_blocking(move || copy::run(copy)).await.map_err(Error::task("a backup's copy"))?
    }
    .await;
    saver.abort();
    let copied = match copied {
        Ok(v) => v,
        Err(e) => {
            // Closing the connection also ends the backup; stopping is polite.
            let _ = pg.backup_stop().await;
            let _ = repo.remove_backup_objects(&label).await;
            return Err(e);
        }
    };
    progress.step(Step::Stopping);
    let stop = match stop_backup(source, start.timeline).await {
        Ok(stop) => stop,
        Err(e) => {
            let _ = repo.remove_backup_objects(&label).await;
            return Err(e);
        }
    };
    let seg = repo.system.wal_segment_size;
    let first = WalSegment::containing(start.timeline, start.lsn, seg);
    let last = WalSegment::containing(start.timeline, Lsn(stop.lsn.0.saturating_sub(1)), seg);
    progress.step(Step::WaitingForWal);
    if let Err(e) = archive_end(source, last, seg).await {
        let _ = repo.remove_backup_objects(&label).await;
        return Err(e);
    }
    if let Err(e) = wait_for_wal(repo, first, last, stanza.settings.archive_timeout).await {
        let _ = repo.remove_backup_objects(&label).await;
        if source.role == ServerRole::Standby && source.primary.is_none() && matches!(e.kind(), Error::Refused(_)) {
            return Err(Error::Refused(format!(
                "{e}; a backup of a standby alone (backup-standby = local) waits for the primary to complete segment {}, which its archive_timeout does only after it writes something that counts (an idle primary may not): write on the primary, or back up the primary",
                last.name(seg)
            )));
        }
        return Err(e);
    }
    let manifest = Manifest {
        label: label.clone(),
        kind,
        prior: prior.map(|p| p.label.clone()),
        start_time,
        stop_time: Utc::now(),
        start_lsn: start.lsn,
        stop_lsn: stop.lsn,
        timeline: start.timeline,
        start_wal: first.name(seg),
        stop_wal: last.name(seg),
        system_id: repo.system.system_id,
        pg_version: pg.version_num().await?,
        start_xid: start.xid,
        stop_xid: stop.xid,
        compress,
        size: copied.size,
        repo_size: copied.repo_size,
        backup_label: stop.label_file,
        tablespace_map: stop.tablespace_map,
        tablespaces,
        dirs: copied.dirs,
        inline_files: Vec::new(),
        file_list: Some(copied.list),
        checksum_error_files: ChecksumErrorFile::of(&copied.checksum_failures),
        page_checksums,
        from: source.role,
        data_directory: Some(now.data_directory),
    };
    progress.step(Step::Finishing);
    repo.write_manifest(&manifest).await?;
    // The backup is complete without it; a left-over checkpoint is ignored.
    let _ = checkpointer.remove().await;
    Ok(Backup {
        manifest,
        resumed: taken.map(|_| copied.kept),
        unread: copied.unread,
        removed,
        full_because,
        passed_over: source.passed_over.clone(),
        seconds: 0.0,
        checksum_failures: copied.checksum_failures,
    })
}

/// What a backup needs to know of the cluster to judge a prior (see
/// [`basis::prior_unusable`]): the server's WAL position and timeline (a
/// standby's replay position and the timeline it receives), that
/// timeline's history from `pg_wal`, else from the repository, and the
/// data directory read.
async fn cluster_now(source: &Source, repo: &Repository, page_checksums: bool) -> Result<ClusterNow> {
    let (timeline, lsn) = match source.role {
        ServerRole::Primary => source.pg.wal_position().await?,
        ServerRole::Standby => {
            let state = source.pg.standby_state().await?;
            match (state.timeline, state.replay) {
                (Some(t), Some(l)) => (t, l),
                _ => {
                    return Err(Error::Refused(format!(
                        "the standby at {} does not report its replay position; run the backup again",
                        source.pg.describe
                    )))
                }
            }
        }
    };
    let history =
        if timeline.0 == 1 {
            Some(TimelineHistory::root(timeline))
        } else {
            let file = source.data.join("pg_wal").join(format!("{:08X}.history", timeline.0));
            match tokio::fs::read_to_string(&file).await {
                Ok(text) => Some(TimelineHistory::parse(timeline, &text).ok_or_else(|| {
                    Error::Corrupt(format!("{} is not a timeline history file; check the data directory", file.display()))
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => repo.timeline_history(timeline).await?,
                Err(e) => return Err(Error::io(format!("cannot read {}", file.display()))(e)),
            }
        };
    Ok(ClusterNow {
        system_id: repo.system.system_id,
        page_checksums,
        timeline,
        lsn,
        history,
        from: source.role,
        data_directory: source::directory_identity(&source.data)?,
    })
}

/// Stops the backup on the server it started on. On a standby, first
/// checks that it is still one (`pg_backup_stop` would also refuse), then
/// that the backup ends on the timeline it started on and, when the
/// primary is known, that the standby kept within `standby-max-lag` of it.
async fn stop_backup(source: &Source, timeline: crate::types::TimelineId) -> Result<crate::pg::BackupStop> {
    let pg = &source.pg;
    if source.role == ServerRole::Primary {
        return pg.backup_stop().await;
    }
    let promoted = || {
        Error::Refused(format!(
            "the standby at {} was promoted during the backup, which is discarded; run the backup again (from the new primary's standby, or with backup-standby = n)",
            pg.describe
        ))
    };
    if !pg.standby_state().await?.in_recovery {
        let _ = pg.backup_stop().await;
        return Err(promoted());
    }
    let stop = pg.backup_stop().await.map_err(|e| match e.to_string().contains("promoted during online backup") {
        true => promoted(),
        false => e,
    })?;
    let ended_on = pg.min_recovery_timeline().await?;
    if ended_on != timeline {
        return Err(Error::Refused(format!(
            "the standby at {} moved from timeline {timeline} to {ended_on} during the backup, which is discarded; run the backup again",
            pg.describe
        )));
    }
    let Some(primary) = &source.primary else { return Ok(stop) };
    let state = pg.standby_state().await?;
    let lag = source::lag(primary, state.replay).await?;
    if lag > source.max_lag {
        return Err(Error::Refused(format!(
            "the standby at {} fell {} behind the primary during the backup, more than standby-max-lag ({}); the backup is discarded: run it again, or raise standby-max-lag",
            pg.describe,
            crate::types::human_bytes(lag),
            crate::types::human_bytes(source.max_lag)
        )));
    }
    Ok(stop)
}

/// Has the segment holding a standby backup's end archived: the primary
/// archives WAL, and completes a segment only when it is full, so it is
/// asked to switch when it is still writing `last`. A primary backup's
/// `pg_backup_stop` switched already; a standby read alone
/// (`backup-standby = local`) waits for the primary's `archive_timeout`.
async fn archive_end(source: &Source, last: WalSegment, seg: u64) -> Result<()> {
    let Some(primary) = &source.primary else { return Ok(()) };
    if primary.current_lsn().await?.0 / seg <= last.number {
        primary.switch_wal_only().await?;
    }
    Ok(())
}

/// Takes over an interrupted attempt: walks the data directory once to
/// find the entries kept from it (see [`resume::Reuse`]), deletes every
/// other object the attempt stored (before anything is copied again under
/// the same keys), and returns the kept entries, to offer again to the
/// copy's walk (a file changed since is copied again).
async fn take_over(
    repo: &Repository,
    interrupted: &Checkpoint,
    pg_data: &std::path::Path,
    prior: Option<&Manifest>,
    began: DateTime<Utc>,
) -> Result<(resume::Reuse, Vec<FileEntry>)> {
    let dir = Repository::backup_dir(&interrupted.label);
    let stored: HashMap<String, u64> = repo.store().list(&dir).await?.into_iter().map(|l| (format!("{dir}/{}", l.key), l.size)).collect();
    let kept = tokio::task::spawn_blocking({
        let (repo, pg_data, prior) = (repo.clone(), pg_data.to_path_buf(), prior.cloned());
        let mut reuse = resume::Reuse::new(interrupted.files.clone(), interrupted.start_time, stored.clone());
        move || {
            let prior = match prior {
                Some(m) => Some((m.clone(), repo.file_reader(&m)?)),
                None => None,
            };
            let mut kept = Vec::new();
            for planned in plan::Planner::new(&pg_data, prior, began)? {
                let planned = planned?;
                if planned.unread.is_none() {
                    kept.extend(reuse.take(&planned.file));
                }
            }
            Ok::<_, Error>(kept)
        }
    })
    .await
    .map_err(Error::task("a backup's walk"))??;
    let keep_keys: std::collections::HashSet<&str> = kept.iter().flat_map(|e| e.own_objects()).map(|(k, _)| k).collect();
    let stale = stored.keys().filter(|k| !keep_keys.contains(k.as_str()) && !crate::repo::keys::is_checkpoint(k)).cloned().collect();
    repo.store().delete_all(stale).await?;
    Ok((resume::Reuse::new(kept.clone(), interrupted.start_time, stored), kept))
}

/// A label that sorts after every label in the repository, finished or
/// not (see [`label_after`]).
async fn new_label(repo: &Repository, kind: BackupType, prior: Option<&Manifest>) -> Result<BackupLabel> {
    let existing: Vec<BackupLabel> = repo.store().list_dirs(crate::repo::keys::BACKUP_DIR).await?.into_iter().map(BackupLabel).collect();
    Ok(label_after(&existing, kind, prior, Utc::now()))
}

/// The label of a new backup taken at `now` (pure): its time is `now`, or
/// one second after the latest time in any `existing` label when the
/// clock reads earlier (stepped back, or a second not over yet), so that
/// the new label sorts after every other and names the newest backup:
/// `backup` builds on the last label, `expire` keeps the last ones.
pub fn label_after(existing: &[BackupLabel], kind: BackupType, prior: Option<&Manifest>, now: chrono::DateTime<Utc>) -> BackupLabel {
    let latest = existing.iter().filter_map(BackupLabel::latest_time).max();
    let time = match latest {
        Some(t) if t >= now.with_nanosecond(0).unwrap_or(now) => t + chrono::Duration::seconds(1),
        _ => now,
    };
    match (kind, prior) {
        (BackupType::Diff, Some(p)) => BackupLabel::dependent(&p.label, time, 'D'),
        (BackupType::Incr, Some(p)) => BackupLabel::dependent(&p.label, time, 'I'),
        _ => BackupLabel::full(time),
    }
}

/// Waits until every segment from `first` to `last` is archived.
/// PostgreSQL archives in order, so this waits for the last one, then
/// checks the whole range in one listing.
async fn wait_for_wal(repo: &Repository, first: WalSegment, last: WalSegment, timeout: u64) -> Result<()> {
    let seg = repo.system.wal_segment_size;
    crate::wal::wait_archived(repo, &last.name(seg), timeout).await?;
    match Repository::first_missing(&repo.list_segments().await?, first, last) {
        None => Ok(()),
        Some(missing) => Err(Error::Refused(format!(
            "WAL segment {} needed by the backup is missing from repo {} although later WAL is there; check archive_command for stanza '{}'",
            missing.name(seg),
            repo.number,
            repo.meta.stanza
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_builds_on_the_newest_backup_of_the_newest_chain_and_diff_on_its_full() {
        let t = Utc::now();
        let m = |label: &str, kind, prior: Option<&str>| Manifest::for_test(label, kind, prior, t, 1000, (1, 2));
        assert_eq!(choose_prior(&[], None).0, BackupType::Full);
        let (kind, prior) = choose_prior(&[], Some(BackupType::Incr));
        assert!(kind == BackupType::Full && prior.is_none(), "nothing to build on");
        let catalog = vec![
            m("A_F", BackupType::Full, None),
            m("A_F_1I", BackupType::Incr, Some("A_F")),
            m("B_F", BackupType::Full, None),
            m("B_F_1D", BackupType::Diff, Some("B_F")),
            m("B_F_2I", BackupType::Incr, Some("B_F_1D")),
        ];
        let pick = |k| choose_prior(&catalog, k).1.map(|p| p.label.0.clone());
        let kind = |k| choose_prior(&catalog, k).0;
        assert_eq!((kind(None), pick(None)), (BackupType::Incr, Some("B_F_2I".into())));
        assert_eq!(pick(Some(BackupType::Diff)), Some("B_F".into()));
        assert_eq!((kind(Some(BackupType::Full)), pick(Some(BackupType::Full))), (BackupType::Full, None));
    }

    #[test]
    fn a_new_label_sorts_after_every_label_even_when_the_clock_went_back() {
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let labels = |v: &[&str]| v.iter().map(|l| BackupLabel(l.to_string())).collect::<Vec<_>>();
        let existing = labels(&["20261201-100000F", "20261201-100000F_20261201-110000I", "20261201-120000F"]);
        let full = label_after(&existing, BackupType::Full, None, at("2026-12-01T09:00:00Z"));
        assert_eq!(full.0, "20261201-120001F");
        let newest = Manifest::for_test("20261201-120000F", BackupType::Full, None, at("2026-12-01T12:00:30Z"), 1000, (1, 2));
        let incr = label_after(&existing, BackupType::Incr, Some(&newest), at("2026-12-01T12:00:00.5Z"));
        assert_eq!(incr.0, "20261201-120000F_20261201-120001I");
        assert!(existing.iter().all(|l| *l < full && *l < incr));
        let later = label_after(&existing, BackupType::Full, None, at("2026-12-02T00:00:00Z"));
        assert_eq!(later.0, "20261202-000000F", "a clock ahead of every label is used as it is");
        let with_dependents = labels(&["20261201-100000F", "20261201-100000F_20261201-130000D"]);
        assert_eq!(label_after(&with_dependents, BackupType::Full, None, at("2026-12-01T12:00:00Z")).0, "20261201-130001F");
    }
}
