//! Online physical backups.
//!
//! The sequence, all on one connection: `pg_backup_start` (fast
//! checkpoint), [`plan`] the files, copy them in parallel (read, checksum,
//! compress, upload, each file streamed in bounded memory), then
//! `pg_backup_stop` (which waits until PostgreSQL has archived the WAL the
//! backup needs), check that every segment from the start to the stop LSN
//! is in the repository, and only then write the manifest. A backup that
//! fails before that point is not a backup: its objects are removed. A
//! killed one leaves objects no manifest points to and a checkpoint, from
//! which the next backup resumes (see [`resume`]).

pub mod basis;
pub mod bundle;
pub mod plan;
pub mod resume;
pub mod source;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use chrono::{Timelike, Utc};

use crate::codec::Compress;
use crate::crypto::{Cipher, Sealing};
use crate::error::{Error, Result};
use crate::pg::checksum::FileCheck;
use crate::pg::checksum::MAX_LISTED;
use crate::progress::{Progress, Step};
use crate::repo::lock::StanzaLock;
use crate::repo::manifest::{Part, PART_SIZE};
use crate::repo::{pages, BackupType, ChecksumErrorFile, FileEntry, Manifest, Repository, ServerRole, Tablespace};
use crate::storage::ObjectWriter;
use crate::types::{BackupLabel, Lsn, TimelineHistory, WalSegment};
use crate::workers::Workers;
use crate::Stanza;
use basis::{Basis, ClusterNow};
pub use plan::{BackupPlan, PlannedFile};
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
        let prior_files = match prior {
            Some(p) => Some((p.clone(), repo.files(p).await?)),
            None => None,
        };
        let mut plan = tokio::task::spawn_blocking({
            let (pg_data, ts) = (pg_data.clone(), tablespaces.clone());
            move || {
                let mut plan = plan::plan(&pg_data, &ts)?;
                if let Some((prior, files)) = &prior_files {
                    plan::incremental(&mut plan, prior, files);
                }
                Ok::<_, Error>(plan)
            }
        })
        .await
        .map_err(Error::task("backup planning"))??;
        let kept = match &taken {
            Some(t) => take_over(repo, t, &mut plan.files).await?,
            None => Vec::new(),
        };
        checkpointer.keep(kept.clone(), start_time);
        // Pages are verified against the backup's start: see pg::checksum.
        let verify = page_checksums.then_some(start.lsn);
        let sink = Sink::new(repo, &label, compress, repo_opts.compress_level);
        progress.step(Step::Copying);
        let mut files = copy_files(&sink, plan.files, stanza.settings.jobs, verify, &checkpointer, Some(progress.clone())).await?;
        let kept_stats = (kept.len(), kept.iter().map(|f| f.size).sum::<u64>());
        files.extend(kept);
        files.sort_by(|a, b| crate::repo::filelist::path_order(&a.path, &b.path));
        Ok::<_, Error>((plan.dirs, files, kept_stats))
    }
    .await;
    saver.abort();
    let (dirs, files, kept_stats) = match copied {
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
    let checksum_failures: Vec<FileEntry> = files.iter().filter(|f| f.checksum_error_pages() > 0).cloned().collect();
    let mut manifest = Manifest {
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
        size: files.iter().map(|f| f.size).sum(),
        repo_size: files.iter().map(|f| f.repo_size).sum(),
        backup_label: stop.label_file,
        tablespace_map: stop.tablespace_map,
        tablespaces,
        dirs,
        inline_files: Vec::new(),
        file_list: None,
        checksum_error_files: ChecksumErrorFile::of(&checksum_failures),
        page_checksums,
        from: source.role,
        data_directory: Some(now.data_directory),
    };
    progress.step(Step::Finishing);
    repo.write_backup(&mut manifest, files).await?;
    // The backup is complete without it; a left-over checkpoint is ignored.
    let _ = checkpointer.remove().await;
    Ok(Backup {
        manifest,
        resumed: taken.map(|_| kept_stats),
        removed,
        full_because,
        passed_over: source.passed_over.clone(),
        seconds: 0.0,
        checksum_failures,
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

/// Takes over an interrupted attempt: returns the entries kept from it,
/// removes their files from `planned`, and deletes every other object the
/// attempt stored.
async fn take_over(repo: &Repository, interrupted: &Checkpoint, planned: &mut Vec<PlannedFile>) -> Result<Vec<FileEntry>> {
    let dir = Repository::backup_dir(&interrupted.label);
    let stored: HashMap<String, u64> = repo.store().list(&dir).await?.into_iter().map(|l| (format!("{dir}/{}", l.key), l.size)).collect();
    let kept = resume::reusable(interrupted, planned, &stored);
    let keep_keys: std::collections::HashSet<&str> = kept.iter().flat_map(|e| e.own_objects()).map(|(k, _)| k).collect();
    let checkpoint = format!("{dir}/{}", resume::CHECKPOINT);
    let stale = stored.into_keys().filter(|k| !keep_keys.contains(k.as_str()) && *k != checkpoint).collect();
    repo.store().delete_all(stale).await?;
    let kept_paths: std::collections::HashSet<&str> = kept.iter().map(|e| e.path.as_str()).collect();
    planned.retain(|f| !kept_paths.contains(f.path.as_str()));
    Ok(kept)
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

/// Copies the files, `jobs` units at a time, largest first; a file over
/// [`PART_SIZE`] is copied as parts, each a unit of its own. Each file is
/// recorded in the checkpoint once all its units are stored. With
/// `verify` (the backup's start LSN, when the cluster has data checksums
/// on), the pages of relation files are checked against their page
/// checksums as they are read.
async fn copy_files(
    sink: &Sink,
    files: Vec<PlannedFile>,
    jobs: usize,
    verify: Option<Lsn>,
    checkpointer: &Checkpointer,
    progress: Option<Arc<Progress>>,
) -> Result<Vec<FileEntry>> {
    // Largest first: the workers finish together instead of one copying
    // the biggest file alone at the end.
    let mut files = files;
    files.sort_by_key(|f| std::cmp::Reverse(f.size));
    let files = Arc::new(files);
    let units: Vec<(usize, Option<Range<u64>>)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| match f.size > PART_SIZE {
            true => (0..f.size.div_ceil(PART_SIZE)).map(|k| (i, Some(k * PART_SIZE..(k + 1) * PART_SIZE))).collect(),
            false => vec![(i, None)],
        })
        .collect();
    let mut units_of: Vec<usize> = vec![0; files.len()];
    units.iter().for_each(|(i, _)| units_of[*i] += 1);
    let progress = progress.unwrap_or_default();
    progress.plan(units.len() as u64, files.iter().map(|f| f.size).sum());
    // `global/pg_control` is read once every other file has been: a
    // standby backup ends at the minimum recovery point recorded there,
    // which must cover every page read (see docs/standby.md).
    let (control, rest): (Vec<_>, Vec<_>) = units.into_iter().partition(|(i, _)| files[*i].path == crate::pg::CONTROL_FILE);
    let mut stored: HashMap<usize, Vec<Option<Stored>>> = HashMap::new();
    let mut out = Vec::with_capacity(files.len());
    for phase in [rest, control] {
        let mut results = copy_workers(sink, &files, phase, jobs, verify, &progress);
        while let Some(done) = results.next().await {
            let (i, piece) = done?;
            let pieces = stored.entry(i).or_default();
            pieces.push(piece);
            if pieces.len() == units_of[i] {
                let pieces = stored.remove(&i).unwrap_or_default();
                if let Some(entry) = assemble(&files[i], pieces) {
                    checkpointer.record(&entry);
                    out.push(entry);
                }
            }
        }
        results.finish().await?;
    }
    let bundler = sink.bundler.clone();
    tokio::task::spawn_blocking(move || bundler.finish())
        .await
        .map_err(Error::task("a backup worker"))?
        .map_err(|e| Error::Io { what: format!("cannot store a bundle in repo {}", sink.repo_no), cause: e })?;
    Ok(out)
}

/// A unit of copying: a file (by its index), or a part of it.
type Unit = (usize, Option<Range<u64>>);

/// `jobs` threads copying `units` in order (see [`Workers`]), each with its
/// own [`Scratch`].
fn copy_workers(
    sink: &Sink,
    files: &Arc<Vec<PlannedFile>>,
    units: Vec<Unit>,
    jobs: usize,
    verify: Option<Lsn>,
    progress: &Arc<Progress>,
) -> Workers<(usize, Option<Stored>)> {
    let (sink, files, progress) = (sink.clone(), files.clone(), progress.clone());
    Workers::start("a backup worker", jobs, units, move |scratch: &mut Scratch, (i, part): &Unit| {
        let f = &files[*i];
        let name = match part {
            Some(r) => format!("{}.part{}", f.path, r.start / PART_SIZE),
            None => f.path.clone(),
        };
        let key = crate::repo::keys::file(&sink.label, &name, sink.compress.extension());
        let check = verify.and_then(|start| Some(FileCheck::new(plan::relation_segment(&f.path)?, start)));
        copy_one(f, part.clone(), &sink, key, &progress, check, scratch).map(|s| (*i, s))
    })
}

/// What a copy worker keeps from one unit to the next.
struct Scratch {
    buf: Vec<u8>,
    record: Vec<u8>,
    contexts: crate::codec::Contexts,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { buf: vec![0u8; 1 << 20], record: Vec::with_capacity(pages::PAGE_SIZE + 8), contexts: Default::default() }
    }
}

/// What one unit stored: a whole file, or one part of it.
struct Stored {
    start: u64,
    size: u64,
    key: Option<String>,
    repo_size: u64,
    offset: Option<u64>,
    checksum: String,
    pages: u64,
    content: Option<String>,
    checksum_errors: Vec<u32>,
    checksum_errors_unlisted: u64,
}

/// The manifest entry of a file from what its units stored; `None` when
/// the file was removed before all of it could be read (the WAL replay
/// handles that).
fn assemble(f: &PlannedFile, pieces: Vec<Option<Stored>>) -> Option<FileEntry> {
    let mut pieces: Vec<Stored> = pieces.into_iter().collect::<Option<_>>()?;
    pieces.sort_by_key(|p| p.start);
    let mut errors: Vec<u32> = pieces.iter().flat_map(|p| p.checksum_errors.iter().copied()).collect();
    let unlisted = pieces.iter().map(|p| p.checksum_errors_unlisted).sum::<u64>() + errors.len().saturating_sub(MAX_LISTED) as u64;
    errors.truncate(MAX_LISTED);
    let entry = FileEntry {
        path: f.path.clone(),
        size: pieces.iter().map(|p| p.start + p.size).max().unwrap_or(0),
        mode: f.mode,
        mtime: f.mtime,
        checksum: String::new(),
        key: None,
        repo_size: pieces.iter().map(|p| p.repo_size).sum(),
        delta: f.delta(),
        pages: pieces.iter().map(|p| p.pages).sum(),
        offset: None,
        content: None,
        checksum_errors: errors,
        checksum_errors_unlisted: unlisted,
        parts: Vec::new(),
        id: f.id,
    };
    if f.size <= PART_SIZE {
        let p = pieces.pop()?;
        return Some(FileEntry { size: p.size, checksum: p.checksum, key: p.key, offset: p.offset, content: p.content, ..entry });
    }
    let parts = pieces
        .into_iter()
        .map(|p| Part {
            start: p.start,
            size: p.size,
            key: p.key,
            repo_size: p.repo_size,
            checksum: p.checksum,
            pages: p.pages,
            content: p.content,
        })
        .collect();
    Some(FileEntry { parts, ..entry })
}

/// Copies one file, or the `part` of it: read, checksum, compress, upload;
/// whole, or as its [`basis`] says; with `check`, every
/// page read is also verified against its page checksum (in a delta too,
/// stored or not). `None` when the file was removed before it could be
/// opened.
/// `global/pg_control` read whole, and again while its CRC fails: the
/// server rewrites it in place, and a read during that write can see part
/// of each version (PostgreSQL's own reader retries the same way, ten
/// times: `src/common/controldata_utils.c`, `get_controlfile_by_exact_path`,
/// "due to a concurrent write").
fn read_control(path: &std::path::Path) -> Result<Vec<u8>> {
    for _ in 0..10 {
        let bytes = std::fs::read(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
        if crate::pg::version::SUPPORTED.iter().any(|m| crate::pg::version::control_is_valid(&bytes, m)) {
            return Ok(bytes);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(Error::Corrupt(format!(
        "{} fails its CRC in 10 reads, or is not the control file of a PostgreSQL pgkeep supports; check the data directory with pg_controldata",
        path.display()
    )))
}

fn copy_one(
    f: &PlannedFile,
    part: Option<Range<u64>>,
    sink: &Sink,
    key: String,
    progress: &Progress,
    mut check: Option<FileCheck>,
    scratch: &mut Scratch,
) -> Result<Option<Stored>> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::FileExt;
    let mut src = match std::fs::File::open(&f.source) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", f.source.display()))(e)),
    };
    let read_err = || Error::io(format!("cannot read {}", f.source.display()));
    let start = part.as_ref().map_or(0, |r| r.start);
    if start > 0 {
        src.seek(std::io::SeekFrom::Start(start)).map_err(read_err())?;
    }
    let control;
    let mut reader: Box<dyn Read + '_> = if f.path == crate::pg::CONTROL_FILE && part.is_none() {
        control = read_control(&f.source)?;
        Box::new(&control[..])
    } else {
        Box::new((&src).take(part.as_ref().map_or(u64::MAX, |r| r.end - r.start)))
    };
    let upload_err = |e: std::io::Error| Error::Io { what: format!("cannot store '{key}' in repo {}", sink.repo_no), cause: e };
    let out = if part.is_none() && f.size < bundle::SMALL_FILE {
        Out::Memory(Vec::new())
    } else {
        Out::Object(Box::new(ObjectWriter::new(sink.store.clone(), &key, sink.rt.clone())))
    };
    let writer = Sealing::new(sink.cipher.as_ref(), out)?;
    let Scratch { buf, record, contexts } = scratch;
    let mut enc = sink.compress.encoder_in(writer, sink.level, contexts).map_err(upload_err)?;
    let mut hasher = blake3::Hasher::new();
    // For a delta, also the hash of the bytes as read: what a full backup
    // would have stored, which `restore --delta` compares against.
    let mut content = f.delta().then(blake3::Hasher::new);
    let (mut size, mut changed) = (0u64, 0u64);
    loop {
        let n = fill(&mut reader, buf).map_err(read_err())?;
        if n == 0 {
            break;
        }
        let first = (start + size) / pages::PAGE_SIZE as u64;
        if let Some(c) = check.as_mut() {
            let reread = |page: u64, out: &mut [u8]| match src.read_exact_at(out, page * pages::PAGE_SIZE as u64) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                Err(e) => Err(e),
            };
            c.check(first, &buf[..n], reread).map_err(read_err())?;
        }
        match f.basis {
            Basis::Whole => {
                hasher.update(&buf[..n]);
                enc.write_all(&buf[..n]).map_err(upload_err)?;
            }
            Basis::Unchanged => {
                if let Some(c) = content.as_mut() {
                    c.update(&buf[..n]);
                }
            }
            Basis::Pages { since } => {
                if let Some(c) = content.as_mut() {
                    c.update(&buf[..n]);
                }
                for (i, page) in buf[..n].chunks(pages::PAGE_SIZE).enumerate() {
                    if pages::page_changed(page, since) {
                        record.clear();
                        pages::write_record(record, (first + i as u64) as u32, page).expect("writes to a Vec");
                        hasher.update(record);
                        enc.write_all(record).map_err(upload_err)?;
                        changed += 1;
                    }
                }
            }
        }
        size += n as u64;
        progress.add_bytes(n as u64);
    }
    progress.file_done();
    let (checksum_errors, checksum_errors_unlisted) = check.map(FileCheck::finish).unwrap_or_default();
    // A delta of no pages stores nothing: dropping the writer unfinished
    // leaves no object behind.
    let (key, repo_size, offset) = if f.delta() && changed == 0 {
        (None, 0, None)
    } else {
        match enc.finish().and_then(Sealing::finish).map_err(upload_err)? {
            Out::Object(w) => {
                let repo_size = w.finish().map_err(upload_err)?;
                (Some(key), repo_size, None)
            }
            Out::Memory(bytes) => {
                let (bundle, offset) = sink.bundler.append(&bytes).map_err(upload_err)?;
                (Some(bundle), bytes.len() as u64, Some(offset))
            }
        }
    };
    Ok(Some(Stored {
        start,
        size,
        key,
        repo_size,
        offset,
        checksum: hasher.finalize().to_hex().to_string(),
        pages: changed,
        content: content.map(|c| c.finalize().to_hex().to_string()),
        checksum_errors,
        checksum_errors_unlisted,
    }))
}

/// Where one file's stored form goes: its own object, or memory, to be
/// appended to a bundle.
enum Out {
    Object(Box<ObjectWriter>),
    Memory(Vec<u8>),
}

impl std::io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::Object(w) => w.write(buf),
            Out::Memory(v) => v.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where and how a backup's files are stored.
#[derive(Clone)]
struct Sink {
    label: BackupLabel,
    bundler: Arc<bundle::Bundler>,
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Handle,
    compress: Compress,
    level: Option<i32>,
    cipher: Option<Cipher>,
    repo_no: usize,
}

impl Sink {
    fn new(repo: &Repository, label: &BackupLabel, compress: Compress, level: Option<i32>) -> Sink {
        let rt = tokio::runtime::Handle::current();
        Sink {
            bundler: Arc::new(bundle::Bundler::new(repo.store().object_store(), crate::repo::keys::bundles(label), rt.clone())),
            label: label.clone(),
            store: repo.store().object_store(),
            rt,
            compress,
            level,
            cipher: repo.cipher.clone(),
            repo_no: repo.number,
        }
    }
}

/// Reads until `buf` is full or the file ends, so that every chunk but the
/// last holds whole pages; returns the bytes read.
fn fill(src: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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

    /// A backup never stores a control file that fails its CRC (a read
    /// torn by the server's rewrite, a damaged file): it reads again, then
    /// fails in one line.
    #[test]
    fn a_control_file_failing_its_crc_is_not_backed_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg_control");
        let good = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/pg/testdata/pg_control.18")).unwrap();
        std::fs::write(&path, &good).unwrap();
        assert_eq!(read_control(&path).unwrap(), good);
        let mut torn = good.clone();
        torn[100] ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        let e = read_control(&path).unwrap_err().to_string();
        assert!(e.contains("fails its CRC in 10 reads") && !e.contains('\n'), "{e}");
    }

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
