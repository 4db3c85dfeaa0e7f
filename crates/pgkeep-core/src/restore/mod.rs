//! Restore: write a backup's files into a data directory and the recovery
//! settings that make PostgreSQL, once started, fetch WAL with
//! `pgkeep archive-get` and stop at the target.
//!
//! Safety:
//! - a running cluster is never touched, a non-empty directory only with
//!   `force`;
//! - every file is checked against its checksum and size as it is written;
//! - `backup_label` and the recovery settings are written and synced, and
//!   every directory synced, before `global/pg_control`, written last: a
//!   restore that stops halfway leaves a directory PostgreSQL refuses to
//!   start (no `pg_control`), never one it would start from the copied
//!   checkpoint instead of the backup's start; on failure the files
//!   written are removed again.

pub mod target;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::codec::Compress;
use crate::crypto::{unsealing, Cipher};
use crate::error::{Error, Result};
use crate::pg::CONTROL_FILE;
use crate::progress::Progress;
use crate::repo::manifest::Piece;
use crate::repo::{pages, ArchivedWal, FileEntry, Manifest, Repository};
use crate::storage::ObjectReader;
use crate::types::{BackupLabel, TimelineHistory, TimelineId, WalSegment};
use crate::Stanza;
pub use target::{Target, TargetAction};

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Destination; default the stanza's pg-data.
    pub pg_data: Option<PathBuf>,
    /// Backup to restore; default chosen for the target.
    pub set: Option<BackupLabel>,
    /// Recovery target; `None` is the end of the archive.
    pub target: Option<Target>,
    /// Stop just before the target instead of just after.
    pub exclusive: bool,
    /// What to do at the target.
    pub action: TargetAction,
    /// `recovery_target_timeline`: latest, current or a number.
    pub timeline: Option<String>,
    /// Replace the contents of a non-empty destination.
    pub force: bool,
    /// Restore into an existing data directory, rewriting only the files
    /// whose content differs from the backup's and removing the files the
    /// backup does not have.
    pub delta: bool,
    /// Tablespace destinations by OID or name: (oid-or-name, directory).
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// With `force`, also empty tablespace directories outside the data
    /// directory that `tablespace_map` does not point elsewhere (the
    /// original locations, in use by the cluster being replaced).
    pub force_tablespaces: bool,
    /// Whether the restored cluster archives WAL; `None`: as the source
    /// did when restoring into the stanza's own pg-data, off elsewhere (a
    /// clone must not archive into the stanza's repository unless asked).
    pub archive_mode: Option<ArchiveMode>,
    /// The `restore_command` to write (the front end knows how it was run).
    pub restore_command: String,
    /// Make the restored cluster a standby (`standby.signal`): it replays
    /// the archive and then, with `primary_conninfo`, streams. No
    /// recovery target goes with it.
    pub standby: bool,
    /// With `standby`: the `primary_conninfo` to write.
    pub primary_conninfo: Option<String>,
    /// Where to count progress.
    pub progress: Option<Arc<Progress>>,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Backup restored.
    pub label: BackupLabel,
    /// Repository it came from.
    pub repo: usize,
    /// Destination.
    pub pg_data: PathBuf,
    /// Files and bytes written.
    pub files: usize,
    /// Bytes of the restored database.
    pub bytes: u64,
    /// Files left as they were because they already held the backup's
    /// content (`delta`).
    pub unchanged: usize,
    /// Files and directories removed because the backup does not have
    /// them (`delta`).
    pub removed: usize,
    /// What was decided for archiving in the restored cluster.
    pub archive_mode: ArchiveMode,
    /// The `recovery_target_timeline` written, if any.
    pub timeline: Option<String>,
    /// Restored as a standby.
    pub standby: bool,
}

/// `restore --archive-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveMode {
    /// Write `archive_mode = off`: the restored cluster archives nothing.
    Off,
    /// Keep the source's archiving settings.
    Preserve,
}

/// The decided restore, before any file is written.
struct Plan {
    repo: Repository,
    /// The backup to restore, then the backups it depends on, newest first.
    chain: Vec<Manifest>,
    pg_data: PathBuf,
    /// (link name under pg_tblspc, destination directory).
    tablespaces: Vec<(u32, PathBuf)>,
    /// The `recovery_target_timeline` to write (see
    /// [`target::choose_with_timeline`]).
    timeline: Option<String>,
    /// The destination is the stanza's own pg-data (as configured, not
    /// as a flag overrides it).
    in_place: bool,
}

/// Restores as `opts` says.
pub async fn run(stanza: &Stanza, opts: &RestoreOptions) -> Result<RestoreReport> {
    let plan = plan(stanza, opts).await?;
    let archive_mode = opts.archive_mode.unwrap_or(if plan.in_place { ArchiveMode::Preserve } else { ArchiveMode::Off });
    let opts = &RestoreOptions { timeline: plan.timeline.clone(), archive_mode: Some(archive_mode), ..opts.clone() };
    let created = prepare_dirs(&plan, opts.force && !opts.delta)?;
    match write_everything(&plan, opts, stanza.settings.jobs).await {
        Ok(report) => Ok(report),
        // A delta restore has already changed a directory that held data:
        // it cannot go back, but without pg_control (written last) the
        // directory will not start half-restored; run the restore again.
        Err(e) if opts.delta => Err(e),
        Err(e) => {
            for dir in created.iter().rev() {
                let _ = clear_dir(dir);
            }
            Err(e)
        }
    }
}

async fn plan(stanza: &Stanza, opts: &RestoreOptions) -> Result<Plan> {
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
        return Err(Error::Input(format!("--pg-data {} must be an absolute path", pg_data.display())));
    }
    check_destination(&pg_data, opts.force || opts.delta, "pass --force to replace its contents")?;
    let in_place = match (&opts.pg_data, &stanza.settings.configured_pg_data) {
        (None, _) => true,
        (Some(asked), Some(own)) => same_path(asked, own),
        (Some(_), None) => false,
    };
    let mut first_err = None;
    for number in 1..=stanza.settings.repos.len() {
        let attempt = async {
            let repo = stanza.open(number).await?;
            let backups = repo.backups().await?;
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
                        &format!(
                            "it is tablespace {oid}'s own location, which --force leaves alone: pass --force-tablespaces to replace it too, or --tablespace-map {oid}=DIR to restore it elsewhere"
                        ),
                    )?;
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

/// `m` and the backups it depends on, newest first.
fn backup_chain(backups: &[Manifest], m: Manifest, repo: usize) -> Result<Vec<Manifest>> {
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
async fn recovery_path(repo: &Repository, asked: Option<&str>, listed: &[ArchivedWal]) -> Result<Option<TimelineHistory>> {
    let timeline = match asked {
        Some("current") => return Ok(None),
        Some(n) if n != "latest" => {
            let number = match n.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => n.parse().ok(),
            };
            let tli = TimelineId(number.ok_or_else(|| Error::Input(format!("--target-timeline '{n}' is not a timeline number")))?);
            return match repo.timeline_history(tli).await? {
                Some(h) => Ok(Some(h)),
                None => Err(Error::Input(format!(
                    "timeline {tli} has no history file in repo {}; check --target-timeline (`pgkeep info` shows the archive)",
                    repo.number
                ))),
            };
        }
        _ => listed.iter().filter_map(|w| u32::from_str_radix(w.name.get(..8)?, 16).ok()).max().map_or(TimelineId(1), TimelineId),
    };
    repo.timeline_history(timeline).await
}

/// The target that decides which backup can reach it: a restore point is
/// looked up in the archived WAL and stands for its LSN.
async fn selection_target(repo: &Repository, backups: &[Manifest], target: &Target) -> Result<Target> {
    let Target::Name(name) = target else { return Ok(target.clone()) };
    let Some(oldest) = backups.first() else { return Ok(target.clone()) };
    match crate::wal::find_restore_point(repo, name, oldest.start_lsn).await? {
        Some(lsn) => Ok(Target::Lsn(lsn)),
        None => Err(Error::Input(format!(
            "restore point '{name}' is not in the archived WAL of repo {} after the first backup; check the name, archive the WAL that holds it (SELECT pg_switch_wal()) or pass --set LABEL",
            repo.number
        ))),
    }
}

/// The archive must hold the WAL that makes the backup consistent, and
/// reach the target: say so now rather than let recovery fail later.
fn check_archive(repo: &Repository, m: &Manifest, target: &Target, segments: Vec<(WalSegment, ArchivedWal)>) -> Result<()> {
    let seg_size = repo.meta.wal_segment_size;
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

fn map_tablespaces(m: &Manifest, map: &[(String, PathBuf)]) -> Result<Vec<(u32, PathBuf)>> {
    for (key, _) in map {
        if !m.tablespaces.iter().any(|t| &t.oid.to_string() == key || &t.name == key) {
            return Err(Error::Input(format!("--tablespace-map {key}: backup {} has no such tablespace", m.label)));
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
fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Where a delta restore keeps the old `pg_control` while it rewrites the
/// directory: not where PostgreSQL looks, so the directory does not start
/// half rewritten, but still there to show whose directory it is if the
/// restore must be run again.
const DELTA_CONTROL: &str = "global/pg_control.pgkeep-delta";

/// `--delta` rewrites a directory in place, keeping files that match:
/// only one that is empty, or holds a data directory of the backup's own
/// system (`PG_VERSION`, and `global/pg_control` whose first field is the
/// system identifier), never anything else a mistyped path points at.
fn check_delta_target(dir: &Path, m: &Manifest) -> Result<()> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(false) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot read {}", dir.display()))(e)),
        Ok(true) => {}
    }
    let refuse = |why: String| {
        Error::Refused(format!(
            "{} {why}, and --delta only rewrites a data directory of the same cluster; restore into an empty directory, or pass --force instead of --delta to replace its contents",
            dir.display()
        ))
    };
    if !dir.join("PG_VERSION").is_file() {
        return Err(refuse("holds no PostgreSQL data directory (no PG_VERSION)".into()));
    }
    let control = [dir.join(CONTROL_FILE), dir.join(DELTA_CONTROL)].into_iter().find_map(|p| std::fs::read(p).ok());
    let Some(control) = control else { return Err(refuse("has no global/pg_control".into())) };
    let id = control.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match id {
        Some(id) if id == m.system_id.0 => Ok(()),
        Some(id) => Err(refuse(format!("holds the data directory of another system ({id}, backup {} is of {})", m.label, m.system_id))),
        None => Err(refuse("has a truncated global/pg_control".into())),
    }
}

/// Refuses a running cluster always, and a non-empty directory unless
/// `force`; `hint` says how to go on.
fn check_destination(dir: &Path, force: bool, hint: &str) -> Result<()> {
    let pid_file = dir.join("postmaster.pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        let pid = text.lines().next().unwrap_or("").trim().to_owned();
        if !pid.is_empty() && Path::new("/proc").join(&pid).exists() {
            return Err(Error::Refused(format!(
                "a PostgreSQL server (pid {pid}) is running on {}; stop it before restoring there",
                dir.display()
            )));
        }
    }
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) if !force => {
            Err(Error::Refused(format!("{} is not empty; restore into an empty or new directory, or {hint}", dir.display())))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot read {}", dir.display()))(e)),
    }
}

/// Creates (or, forced, empties) the destinations; returns those to clear
/// again if the restore fails.
fn prepare_dirs(plan: &Plan, force: bool) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![plan.pg_data.clone()];
    dirs.extend(plan.tablespaces.iter().map(|(_, d)| d.clone()));
    // 0700, or 0750 when the source allowed its group to read (initdb
    // --allow-group-access: its files are 0640), as PostgreSQL requires.
    let group = plan.chain[0].files.iter().any(|f| f.path == CONTROL_FILE && f.mode & 0o040 != 0);
    let mode = if group { 0o750 } else { 0o700 };
    for d in &dirs {
        if force {
            clear_dir(d).map_err(Error::io(format!("cannot empty {}", d.display())))?;
        }
        std::fs::create_dir_all(d).map_err(Error::io(format!("cannot create {}", d.display())))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io(format!("cannot set the mode of {}", d.display())))?;
    }
    Ok(dirs)
}

fn clear_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let p = e?.path();
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn write_everything(plan: &Plan, opts: &RestoreOptions, jobs: usize) -> Result<RestoreReport> {
    let m = &plan.chain[0];
    let root = &plan.pg_data;
    let io = |what: String| Error::io(what);
    if opts.delta {
        // First of all, so that the directory does not start while it is
        // half rewritten.
        match std::fs::rename(root.join(CONTROL_FILE), root.join(DELTA_CONTROL)) {
            Ok(()) => sync_dir(&root.join("global"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("cannot move {} aside", root.join(CONTROL_FILE).display()))(e)),
        }
    }
    let removed = if opts.delta { remove_extraneous(root, m).map_err(io(format!("cannot clean {}", root.display())))? } else { 0 };
    for d in &m.dirs {
        let path = root.join(&d.path);
        if let Some((oid, dest)) = tablespace_link(&d.path, &plan.tablespaces) {
            if std::fs::read_link(&path).is_ok_and(|l| &l == dest) {
                continue;
            }
            if path.is_symlink() || path.is_file() {
                std::fs::remove_file(&path).map_err(io(format!("cannot replace {}", path.display())))?;
            } else if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(format!("cannot replace {}", path.display())))?;
            }
            std::os::unix::fs::symlink(dest, &path).map_err(io(format!("cannot link tablespace {oid} to {}", dest.display())))?;
            continue;
        }
        std::fs::create_dir_all(&path).map_err(io(format!("cannot create {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(d.mode & 0o7777))
            .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    }
    for sub in ["pg_wal", "pg_wal/archive_status"] {
        std::fs::create_dir_all(root.join(sub)).map_err(io(format!("cannot create {sub}")))?;
    }

    let by_path: Vec<HashMap<&str, &FileEntry>> =
        plan.chain.iter().map(|b| b.files.iter().map(|f| (f.path.as_str(), f)).collect()).collect();
    let (last, mut rest): (Vec<&FileEntry>, Vec<&FileEntry>) = m.files.iter().partition(|f| f.path == CONTROL_FILE);
    // Largest first, so that the workers finish together.
    rest.sort_by_key(|f| std::cmp::Reverse(f.size));
    let mut units = Vec::new();
    for (i, f) in rest.iter().enumerate() {
        let layers = layers(&plan.chain, &by_path, &f.path)?;
        if !f.parts.is_empty() {
            prepare_parted(&root.join(&f.path), f, opts.delta)?;
        }
        units.extend(restore_units(f, &layers).into_iter().map(|u| (i, u)));
    }
    let units = interleave(units, jobs);
    let progress = opts.progress.clone().unwrap_or_default();
    progress.plan(units.len() as u64 + last.len() as u64, m.size);
    let source = Source::new(&plan.repo);
    let delta = opts.delta;
    let fetch = |(i, u): (usize, Unit)| {
        let (source, progress, dest) = (source.clone(), progress.clone(), root.join(&u.file.path));
        tokio::task::spawn_blocking(move || restore_unit(&u, &dest, &source, &progress, delta).map(|kept| (i, kept)))
    };
    let done: Vec<(usize, bool)> = futures::stream::iter(units)
        .map(fetch)
        .buffer_unordered(jobs)
        .map(|j| j.map_err(Error::task("a restore worker"))?)
        .try_collect()
        .await?;
    // What tells PostgreSQL where to start recovery goes in before
    // pg_control, which alone would let it start from the copied
    // checkpoint: backup_label, then the recovery settings, then every
    // directory synced, and pg_control last.
    write_file(&root.join("backup_label"), m.backup_label.as_bytes())?;
    write_recovery_settings(root, m, opts)?;
    sync_dirs(root, m)?;
    for f in last {
        for u in restore_units(f, &layers(&plan.chain, &by_path, &f.path)?) {
            fetch((usize::MAX, u)).await.map_err(Error::task("a restore worker"))??;
        }
    }
    if opts.delta {
        let _ = std::fs::remove_file(root.join(DELTA_CONTROL));
    }
    sync_dir(&root.join("global"))?;
    // A file is unchanged when every unit of it was.
    let mut changed = vec![false; rest.len()];
    let mut seen = vec![false; rest.len()];
    for (i, kept) in done {
        seen[i] = true;
        changed[i] |= !kept;
    }
    let unchanged = seen.iter().zip(&changed).filter(|(s, c)| **s && !**c).count();
    Ok(RestoreReport {
        label: m.label.clone(),
        repo: plan.repo.number,
        pg_data: root.clone(),
        files: m.files.len(),
        bytes: m.size,
        unchanged,
        removed,
        archive_mode: opts.archive_mode.unwrap_or(ArchiveMode::Preserve),
        timeline: opts.timeline.clone(),
        standby: opts.standby,
    })
}

/// Whether `dest` has the size of `f` and holds, over `range`, the bytes
/// whose BLAKE3 is `expect`.
fn same_range(dest: &Path, f: &FileEntry, range: &Range<u64>, expect: &str) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let file = match std::fs::File::open(dest) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() || file.metadata()?.len() != f.size {
        return Ok(false);
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = range.start;
    while at < range.end {
        let n = buf.len().min((range.end - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize().to_hex().as_str() == expect)
}

/// entries went.
fn remove_extraneous(root: &Path, m: &Manifest) -> std::io::Result<usize> {
    let mut files: HashSet<&str> = m.files.iter().map(|f| f.path.as_str()).filter(|p| *p != CONTROL_FILE).collect();
    files.insert(DELTA_CONTROL);
    let mut dirs: HashSet<&str> = m.dirs.iter().map(|d| d.path.as_str()).collect();
    dirs.extend(["pg_wal", "pg_wal/archive_status"]);
    fn walk(root: &Path, rel: &str, files: &HashSet<&str>, dirs: &HashSet<&str>) -> std::io::Result<usize> {
        let mut removed = 0;
        let entries = match std::fs::read_dir(root.join(rel)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                std::fs::remove_file(entry.path())?;
                removed += 1;
                continue;
            };
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let kind = entry.file_type()?;
            let is_dir = kind.is_dir() || (kind.is_symlink() && entry.path().is_dir());
            if is_dir && dirs.contains(child.as_str()) {
                removed += walk(root, &child, files, dirs)?;
            } else if !is_dir && !kind.is_symlink() && files.contains(child.as_str()) {
                continue;
            } else {
                if kind.is_dir() {
                    std::fs::remove_dir_all(entry.path())?;
                } else {
                    std::fs::remove_file(entry.path())?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }
    walk(root, "", &files, &dirs)
}

/// The entries of `path` that rebuild it in `chain[0]`, oldest (a whole
/// copy) first, with their backup's compression.
fn layers<'a>(chain: &'a [Manifest], by_path: &[HashMap<&str, &'a FileEntry>], path: &str) -> Result<Vec<(&'a FileEntry, Compress)>> {
    let mut out = Vec::new();
    for (b, files) in chain.iter().zip(by_path) {
        let Some(f) = files.get(path) else {
            return Err(Error::Corrupt(format!(
                "backup {} holds {path} as changes over backup {}, which does not have it; restore another backup",
                chain[0].label, b.label
            )));
        };
        out.push((*f, b.compress));
        if !f.delta {
            out.reverse();
            return Ok(out);
        }
    }
    Err(Error::Corrupt(format!("backup {} holds {path} as changes, but no backup of its chain holds the whole file", chain[0].label)))
}

/// One unit of a restore: a byte range of a file, rebuilt from the
/// pieces of its layers that cover it, oldest first.
struct Unit {
    file: FileEntry,
    range: Range<u64>,
    pieces: Vec<(Piece, Compress)>,
    /// BLAKE3 of the range's bytes in the backup, when one piece of the
    /// file itself covers exactly the range (`restore --delta` compares).
    expect: Option<String>,
    /// For a file in parts: its units not finished yet. The last one to
    /// finish syncs the file, once, instead of each part waiting for the
    /// disk while the others write.
    left: Option<Arc<AtomicUsize>>,
}

/// The units that restore `f`: one per part for a file stored in parts,
/// else the whole file. Every piece overlapping a unit's range is read
/// whole (and checked) by that unit; only the bytes in the range are
/// written.
fn restore_units(f: &FileEntry, layers: &[(&FileEntry, Compress)]) -> Vec<Unit> {
    let mut starts: Vec<u64> = f.parts.iter().map(|p| p.start).filter(|s| *s < f.size).collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    let own = f.pieces();
    let left = (!f.parts.is_empty()).then(|| Arc::new(AtomicUsize::new(starts.len())));
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let range = start..starts.get(k + 1).copied().unwrap_or(f.size);
            let pieces = layers
                .iter()
                .flat_map(|(e, c)| e.pieces().into_iter().map(move |p| (p, *c)))
                .filter(|(p, _)| p.start < range.end && p.start + p.size > range.start)
                .collect();
            let expect = own.iter().find(|p| p.start == range.start && p.start + p.size == range.end).map(|p| p.content.clone());
            Unit { file: f.clone(), range, pieces, expect, left: left.clone() }
        })
        .collect()
}

/// Orders units (tagged with their file's index, files largest first) so
/// that the file with the most units left goes first, but not a file one
/// of the `jobs - 1` units before it belongs to when another file has
/// units left: two workers writing one file contend in the kernel, and the
/// large files still finish together at the end.
fn interleave<T>(units: Vec<(usize, T)>, jobs: usize) -> Vec<(usize, T)> {
    use std::collections::{BinaryHeap, VecDeque};
    let mut by_file: Vec<(usize, VecDeque<T>)> = Vec::new();
    for (i, u) in units {
        match by_file.last_mut() {
            Some((last, q)) if *last == i => q.push_back(u),
            _ => by_file.push((i, VecDeque::from([u]))),
        }
    }
    // (units left, earlier file first, position in by_file)
    let mut heap: BinaryHeap<(usize, std::cmp::Reverse<usize>, usize)> =
        by_file.iter().enumerate().map(|(k, (_, q))| (q.len(), std::cmp::Reverse(k), k)).collect();
    let mut recent: VecDeque<usize> = VecDeque::new();
    let mut out = Vec::new();
    while !heap.is_empty() {
        let mut skipped = Vec::new();
        let pick = loop {
            match heap.pop() {
                Some(top) if recent.contains(&top.2) => skipped.push(top),
                Some(top) => break Some(top),
                None => break None,
            }
        };
        let (left, order, k) = match pick {
            Some(p) => p,
            // Only recently used files have units left: take the first.
            None => skipped.remove(0),
        };
        heap.extend(skipped);
        let (i, q) = &mut by_file[k];
        out.extend(q.pop_front().map(|u| (*i, u)));
        if left > 1 {
            heap.push((left - 1, order, k));
        }
        recent.push_back(k);
        if recent.len() >= jobs.max(1) {
            recent.pop_front();
        }
    }
    out
}

/// Creates (or, for a delta restore, keeps) a file restored in parts, at
/// its final size and mode, before its parts are written.
fn prepare_parted(dest: &Path, f: &FileEntry, delta: bool) -> Result<()> {
    let what = || format!("cannot create {}", dest.display());
    let file = std::fs::OpenOptions::new().create(true).write(true).truncate(!delta).open(dest).map_err(Error::io(what()))?;
    if file.metadata().map_err(Error::io(what()))?.len() != f.size {
        file.set_len(f.size).map_err(Error::io(what()))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))
}

fn tablespace_link<'a>(path: &str, map: &'a [(u32, PathBuf)]) -> Option<(u32, &'a PathBuf)> {
    let oid = path.strip_prefix("pg_tblspc/")?;
    map.iter().find(|(o, _)| o.to_string() == oid).map(|(o, d)| (*o, d))
}

/// Where a restore reads stored objects from, and how to decrypt them.
#[derive(Clone)]
pub(crate) struct Source {
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Handle,
    cipher: Option<Cipher>,
    repo_no: usize,
}

impl Source {
    /// Reading from `repo`, driving I/O on the current runtime.
    pub(crate) fn new(repo: &Repository) -> Source {
        Source {
            store: repo.store().object_store(),
            rt: tokio::runtime::Handle::current(),
            cipher: repo.cipher.clone(),
            repo_no: repo.number,
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Reads one stored piece of the file at `path`, checking its checksum
/// (and a whole piece's size), and hands what it holds to `out` as (file
/// offset, bytes): the file's bytes in order, or a delta's pages. Errors
/// name the object; nothing handed out is trustworthy until this returns
/// `Ok`.
pub(crate) fn read_piece(
    source: &Source,
    piece: &Piece,
    compress: Compress,
    path: &str,
    mut out: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let Some(key) = &piece.key else { return Ok(()) };
    let object = format!("stored object '{key}' in repo {}", source.repo_no);
    let corrupt = |e: std::io::Error| {
        if e.get_ref().is_some_and(|i| i.is::<object_store::Error>()) {
            Error::Io { what: format!("cannot read {object}"), cause: e }
        } else {
            Error::Corrupt(format!("{object} cannot be decompressed ({e}): it is corrupt or truncated; restore another backup"))
        }
    };
    let reader = ObjectReader::open(source.store.clone(), key, piece.range.clone(), source.rt.clone())
        .map_err(Error::storage(format!("cannot read {object}")))?;
    let dec = compress.decoder(unsealing(source.cipher.as_ref(), reader).map_err(corrupt)?).map_err(corrupt)?;
    let mut src = Hashing { inner: dec, hasher: blake3::Hasher::new(), bytes: 0 };
    let mut buf = vec![0u8; 1 << 20];
    if piece.delta {
        while let Some(number) = pages::read_record(&mut src, &mut buf).map_err(corrupt)? {
            out(number as u64 * pages::PAGE_SIZE as u64, &buf)?;
        }
    } else {
        let mut at = piece.start;
        loop {
            let n = src.read(&mut buf).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            out(at, &buf[..n])?;
            at += n as u64;
        }
    }
    let whole_size_ok = piece.delta || src.bytes == piece.size;
    if !whole_size_ok || src.hasher.finalize().to_hex().as_str() != piece.checksum {
        return Err(Error::Corrupt(format!(
            "{object} fails its checksum (read {} bytes for {path}): it is corrupt or truncated; restore another backup",
            src.bytes
        )));
    }
    Ok(())
}

/// Restores one unit; returns true when a delta restore found the range
/// already holding the backup's bytes. Checks every piece's checksum (and
/// a whole piece's size) as it is read; writes only inside the range. A
/// whole file is created here and cut to its size; a part's file was made
/// by [`prepare_parted`].
fn restore_unit(u: &Unit, dest: &Path, source: &Source, progress: &Progress, delta: bool) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = &u.file;
    let parted = !f.parts.is_empty();
    if delta {
        if let Some(expect) = &u.expect {
            if same_range(dest, f, &u.range, expect).map_err(Error::io(format!("cannot read {}", dest.display())))? {
                if !parted {
                    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(f.mode & 0o7777))
                        .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))?;
                }
                progress.add_bytes(u.range.end - u.range.start);
                progress.file_done();
                if u.left.as_ref().is_some_and(|l| l.fetch_sub(1, Ordering::AcqRel) == 1) {
                    sync_file(dest)?;
                }
                return Ok(true);
            }
        }
    }
    let out = if parted { std::fs::OpenOptions::new().write(true).open(dest) } else { std::fs::File::create(dest) }
        .map_err(Error::io(format!("cannot create {}", dest.display())))?;
    let write_err = || Error::io(format!("cannot write {}", dest.display()));
    // Writes the part of `data` (at file offset `at`) inside the range.
    let mut write_in_range = |at: u64, data: &[u8]| -> Result<()> {
        let from = at.max(u.range.start);
        let to = (at + data.len() as u64).min(u.range.end);
        if from < to {
            out.write_all_at(&data[(from - at) as usize..(to - at) as usize], from).map_err(write_err())?;
            progress.add_bytes(to - from);
        }
        Ok(())
    };
    for (piece, compress) in &u.pieces {
        read_piece(source, piece, *compress, &f.path, &mut write_in_range)?;
    }
    if let Some(left) = &u.left {
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            out.sync_all().map_err(Error::io(format!("cannot sync {}", dest.display())))?;
        }
    } else {
        out.set_len(f.size).map_err(write_err())?;
        out.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))?;
        out.sync_all().map_err(Error::io(format!("cannot sync {}", dest.display())))?;
    }
    progress.file_done();
    Ok(false)
}

/// Syncs a directory, so that the entries created in it survive a crash.
fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(Error::io(format!("cannot sync directory {}", path.display())))
}

/// Syncs every directory of the restored data directory (tablespace
/// directories through their links), children before parents, and the
/// data directory itself.
fn sync_dirs(root: &Path, m: &Manifest) -> Result<()> {
    let mut dirs: Vec<&str> = m.dirs.iter().map(|d| d.path.as_str()).chain(["pg_wal/archive_status", "pg_wal"]).collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for d in dirs {
        sync_dir(&root.join(d))?;
    }
    sync_dir(root)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(Error::io(format!("cannot sync {}", path.display())))
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let what = || format!("cannot write {}", path.display());
    let mut f = std::fs::File::create(path).map_err(Error::io(what()))?;
    f.write_all(data)
        .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .and_then(|_| f.sync_all())
        .map_err(Error::io(what()))
}

/// The recovery settings pgkeep owns; earlier values of these in
/// `postgresql.auto.conf` (from the source or an earlier restore) are
/// dropped so only ours apply.
const RECOVERY_KEYS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
];

/// The lines appended to `postgresql.auto.conf`.
pub fn recovery_settings(label: &BackupLabel, opts: &RestoreOptions) -> Vec<String> {
    let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
    let mut lines = vec![format!("# recovery settings written by pgkeep restore of backup {label}")];
    lines.push(format!("restore_command = {}", quote(&opts.restore_command)));
    let target = match &opts.target {
        None | Some(Target::End) => None,
        Some(Target::Immediate) => Some(("recovery_target", "immediate".to_owned())),
        Some(Target::Time(t)) => Some(("recovery_target_time", target::format_time(t))),
        Some(Target::Lsn(l)) => Some(("recovery_target_lsn", l.to_string())),
        Some(Target::Xid(x)) => Some(("recovery_target_xid", x.to_string())),
        Some(Target::Name(n)) => Some(("recovery_target_name", n.clone())),
    };
    if let Some(conninfo) = opts.primary_conninfo.as_deref().filter(|_| opts.standby) {
        lines.push(format!("primary_conninfo = {}", quote(conninfo)));
    }
    if let Some((key, value)) = target.filter(|_| !opts.standby) {
        lines.push(format!("{key} = {}", quote(&value)));
        if opts.exclusive && key != "recovery_target" {
            lines.push("recovery_target_inclusive = false".into());
        }
        lines.push(format!("recovery_target_action = {}", quote(opts.action.as_str())));
    }
    if let Some(tl) = &opts.timeline {
        lines.push(format!("recovery_target_timeline = {}", quote(tl)));
    }
    if opts.archive_mode == Some(ArchiveMode::Off) {
        lines.push("archive_mode = 'off'".into());
    }
    lines
}

fn write_recovery_settings(root: &Path, m: &Manifest, opts: &RestoreOptions) -> Result<()> {
    let auto = root.join("postgresql.auto.conf");
    let old = std::fs::read_to_string(&auto).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            let ours = RECOVERY_KEYS.contains(&key)
                || (key == "archive_mode" && opts.archive_mode == Some(ArchiveMode::Off))
                || (key == "primary_conninfo" && opts.primary_conninfo.is_some() && opts.standby);
            !ours && !l.starts_with("# recovery settings written by pgkeep")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for l in recovery_settings(&m.label, opts) {
        text.push_str(&l);
        text.push('\n');
    }
    write_file(&auto, text.as_bytes())?;
    // With both files PostgreSQL runs as a standby: remove the other one
    // (a delta restore over a standby, or a standby made of a primary).
    let (signal, other) = match opts.standby {
        true => ("standby.signal", "recovery.signal"),
        false => ("recovery.signal", "standby.signal"),
    };
    match std::fs::remove_file(root.join(other)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot remove {}", root.join(other).display()))(e)),
    }
    write_file(&root.join(signal), b"")
}

/// Validates a `--target-timeline` value.
pub fn parse_timeline(s: &str) -> Result<String> {
    match s {
        "latest" | "current" => Ok(s.to_owned()),
        n if n.parse::<u32>().is_ok_and(|n| n > 0) => Ok(n.to_owned()),
        hex if hex.starts_with("0x") && u32::from_str_radix(&hex[2..], 16).is_ok() => Ok(hex.to_owned()),
        _ => Err(Error::Input(format!("--target-timeline '{s}' must be latest, current or a timeline number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::Part;

    fn entry(size: u64, delta: bool, parts: &[(u64, u64)]) -> FileEntry {
        FileEntry {
            checksum: if parts.is_empty() { format!("whole-{size}") } else { String::new() },
            key: parts.is_empty().then(|| format!("k{size}")),
            repo_size: 1,
            delta,
            parts: parts
                .iter()
                .map(|&(start, size)| Part {
                    start,
                    size,
                    key: Some(format!("p{start}")),
                    repo_size: 1,
                    checksum: format!("c{start}"),
                    pages: 0,
                    content: delta.then(|| format!("content{start}")),
                })
                .collect(),
            ..FileEntry::for_test("base/5/16384", size, 0)
        }
    }

    #[test]
    fn units_of_one_file_are_spread_so_workers_write_different_files() {
        let units: Vec<(usize, u32)> = [(0, 5), (1, 3), (2, 1), (3, 1)].iter().flat_map(|&(f, n)| (0..n).map(move |k| (f, k))).collect();
        let order: Vec<(usize, u32)> = interleave(units.clone(), 2);
        assert_eq!(order.len(), units.len());
        let files: Vec<usize> = order.iter().map(|(f, _)| *f).collect();
        assert_eq!(files, [0, 1, 0, 1, 0, 1, 0, 2, 0, 3]);
        // Each file's units stay in order.
        let parts0: Vec<u32> = order.iter().filter(|(f, _)| *f == 0).map(|(_, k)| *k).collect();
        assert_eq!(parts0, [0, 1, 2, 3, 4]);
        // One worker: nothing to avoid; most units left first.
        assert_eq!(interleave(units, 1).iter().map(|(f, _)| *f).collect::<Vec<_>>(), [0, 0, 0, 1, 0, 1, 0, 1, 2, 3]);
    }

    #[test]
    fn a_file_in_parts_restores_as_one_unit_per_part_reading_every_piece_that_overlaps() {
        const P: u64 = 100;
        // A whole copy of 150 bytes, then a delta in parts after the file
        // grew to 250 bytes.
        let base = entry(150, false, &[]);
        let incr = entry(250, true, &[(0, P), (P, P), (2 * P, 50)]);
        let layers = vec![(&base, Compress::Zstd), (&incr, Compress::Lz4)];
        let units = restore_units(&incr, &layers);
        let shape: Vec<(Range<u64>, Vec<String>)> =
            units.iter().map(|u| (u.range.clone(), u.pieces.iter().map(|(p, _)| p.key.clone().unwrap()).collect())).collect();
        assert_eq!(
            shape,
            vec![
                (0..P, vec!["k150".to_string(), "p0".into()]),
                (P..2 * P, vec!["k150".to_string(), "p100".into()]),
                (2 * P..250, vec!["p200".to_string()]),
            ]
        );
        assert_eq!(units[1].expect.as_deref(), Some("content100"), "a delta part compares by its content hash");
        assert_eq!(units[1].pieces[1].1, Compress::Lz4, "each piece keeps its backup's compression");

        // Cut to 120 bytes since a backup in parts: the parts past the end
        // are not read; the unit ends at the new size.
        let big = entry(300, false, &[(0, P), (P, P), (2 * P, P)]);
        let cut = entry(120, true, &[]);
        let units = restore_units(&cut, &[(&big, Compress::Zstd), (&cut, Compress::Zstd)]);
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].range, 0..120);
        let keys: Vec<String> = units[0].pieces.iter().map(|(p, _)| p.key.clone().unwrap()).collect();
        assert_eq!(keys, ["p0", "p100", "k120"]);
        assert_eq!(units[0].expect.as_deref(), Some("whole-120"));
    }

    #[test]
    fn writes_the_target_settings_postgres_reads() {
        let opts = RestoreOptions {
            target: Some(Target::Xid(42)),
            exclusive: true,
            action: TargetAction::Pause,
            timeline: Some("current".into()),
            restore_command: "/usr/bin/pgkeep --stanza it's archive-get %f \"%p\"".into(),
            ..Default::default()
        };
        let lines = recovery_settings(&BackupLabel("L".into()), &opts);
        assert_eq!(
            lines[1..],
            [
                "restore_command = '/usr/bin/pgkeep --stanza it''s archive-get %f \"%p\"'",
                "recovery_target_xid = '42'",
                "recovery_target_inclusive = false",
                "recovery_target_action = 'pause'",
                "recovery_target_timeline = 'current'",
            ]
        );
        let end = recovery_settings(&BackupLabel("L".into()), &RestoreOptions::default());
        assert_eq!(end.len(), 2, "no target, no action: {end:?}");
    }

    #[test]
    fn a_standby_gets_its_primary_and_no_target() {
        let opts = RestoreOptions {
            standby: true,
            primary_conninfo: Some("host=db1 user='rep'".into()),
            target: Some(Target::Immediate),
            restore_command: "pgkeep archive-get %f \"%p\"".into(),
            ..Default::default()
        };
        let lines = recovery_settings(&BackupLabel("L".into()), &opts);
        assert_eq!(lines[1..], ["restore_command = 'pgkeep archive-get %f \"%p\"'", "primary_conninfo = 'host=db1 user=''rep'''"]);
    }

    #[test]
    fn refuses_non_empty_directories_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_destination(&dir.path().join("new"), false, "h").is_ok());
        assert!(check_destination(dir.path(), false, "h").is_ok());
        std::fs::write(dir.path().join("PG_VERSION"), "15").unwrap();
        assert!(matches!(check_destination(dir.path(), false, "h"), Err(Error::Refused(_))));
        assert!(check_destination(dir.path(), true, "h").is_ok());
        std::fs::write(dir.path().join("postmaster.pid"), format!("{}\n", std::process::id())).unwrap();
        let e = check_destination(dir.path(), true, "h").unwrap_err().to_string();
        assert!(e.contains("is running"), "{e}");
    }
}
