//! Restore: write a backup's files into a data directory and the recovery
//! settings that make PostgreSQL, once started, fetch WAL with
//! `pgkeep archive-get` and stop at the target.
//!
//! Safety:
//! - a running cluster is never touched, a non-empty directory only with
//!   `force`;
//! - every file is checked against its checksum and size as it is written;
//! - `global/pg_control` and `backup_label` are written last, so a restore
//!   that stops halfway leaves a directory PostgreSQL refuses to start,
//!   never one it would start inconsistent; on failure the files written are
//!   removed again.

pub mod target;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::codec::Compress;
use crate::crypto::{unsealing, Cipher};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{pages, FileEntry, Manifest, Repository};
use crate::storage::ObjectReader;
use crate::types::{BackupLabel, WalSegment};
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
    /// The `restore_command` to write (the front end knows how it was run).
    pub restore_command: String,
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
}

/// The decided restore, before any file is written.
struct Plan {
    repo: Repository,
    /// The backup to restore, then the backups it depends on, newest first.
    chain: Vec<Manifest>,
    pg_data: PathBuf,
    /// (link name under pg_tblspc, destination directory).
    tablespaces: Vec<(u32, PathBuf)>,
}

/// Restores as `opts` says.
pub async fn run(stanza: &Stanza, opts: &RestoreOptions) -> Result<RestoreReport> {
    let plan = plan(stanza, opts).await?;
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
    let pg_data = match &opts.pg_data {
        Some(p) => p.clone(),
        None => stanza.settings.pg_data()?.to_path_buf(),
    };
    if !pg_data.is_absolute() {
        return Err(Error::Input(format!("--pg-data {} must be an absolute path", pg_data.display())));
    }
    check_destination(&pg_data, opts.force || opts.delta)?;
    let mut first_err = None;
    for number in 1..=stanza.settings.repos.len() {
        let attempt = async {
            let repo = stanza.open(number).await?;
            let backups = repo.backups().await?;
            let m = target::choose(&backups, &selection_target(&repo, &backups, &target).await?, opts.set.as_ref())?.clone();
            check_archive(&repo, &m, &target).await?;
            let chain = backup_chain(&backups, m, repo.number)?;
            Ok::<_, Error>((repo, chain))
        };
        match attempt.await {
            Ok((repo, chain)) => {
                let tablespaces = map_tablespaces(&chain[0], &opts.tablespace_map)?;
                for (_, dir) in &tablespaces {
                    check_destination(dir, opts.force || opts.delta)?;
                }
                return Ok(Plan { repo, chain, pg_data, tablespaces });
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
async fn check_archive(repo: &Repository, m: &Manifest, target: &Target) -> Result<()> {
    let segments = repo.list_segments().await?;
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

/// Refuses a running cluster always, and a non-empty directory unless forced.
fn check_destination(dir: &Path, force: bool) -> Result<()> {
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
        Ok(true) if !force => Err(Error::Refused(format!(
            "{} is not empty; restore into an empty or new directory, or pass --force to replace its contents",
            dir.display()
        ))),
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
    for d in &dirs {
        if force {
            clear_dir(d).map_err(Error::io(format!("cannot empty {}", d.display())))?;
        }
        std::fs::create_dir_all(d).map_err(Error::io(format!("cannot create {}", d.display())))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
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
    let mut files = Vec::with_capacity(m.files.len());
    for f in &m.files {
        files.push((f, layers(&plan.chain, &by_path, &f.path)?));
    }
    let (last, mut rest): (Vec<_>, Vec<_>) = files.into_iter().partition(|(f, _)| f.path == "global/pg_control");
    // Largest first, so that the workers finish together.
    rest.sort_by_key(|(f, _)| std::cmp::Reverse(f.size));
    let progress = opts.progress.clone().unwrap_or_default();
    progress.plan(m.files.len() as u64, m.size);
    let store = plan.repo.store().object_store();
    let rt = tokio::runtime::Handle::current();
    let (repo_no, delta) = (plan.repo.number, opts.delta);
    let fetch = |(f, layers): (&FileEntry, Vec<Layer>)| {
        let (f, store, rt, progress, dest) = (f.clone(), store.clone(), rt.clone(), progress.clone(), root.join(&f.path));
        let cipher = plan.repo.cipher.clone();
        tokio::task::spawn_blocking(move || {
            if delta && same_content(&dest, &f).map_err(Error::io(format!("cannot read {}", dest.display())))? {
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode & 0o7777))
                    .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))?;
                progress.add_bytes(f.size);
                progress.file_done();
                return Ok(true);
            }
            let source = Source { store, rt, cipher, repo_no };
            restore_file(&f, &layers, &dest, &source, &progress).map(|_| false)
        })
    };
    let kept: Vec<bool> = futures::stream::iter(rest)
        .map(fetch)
        .buffer_unordered(jobs)
        .map(|j| j.map_err(|e| Error::Input(format!("a restore worker stopped: {e}")))?)
        .try_collect()
        .await?;
    write_recovery_settings(root, m, opts)?;
    for f in last {
        fetch(f).await.map_err(|e| Error::Input(format!("a restore worker stopped: {e}")))??;
    }
    write_file(&root.join("backup_label"), m.backup_label.as_bytes())?;
    Ok(RestoreReport {
        label: m.label.clone(),
        repo: repo_no,
        pg_data: root.clone(),
        files: m.files.len(),
        bytes: m.size,
        unchanged: kept.iter().filter(|k| **k).count(),
        removed,
    })
}

/// Whether `dest` already holds exactly the file as the backup read it.
fn same_content(dest: &Path, f: &FileEntry) -> std::io::Result<bool> {
    let mut file = match std::fs::File::open(dest) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() || file.metadata()?.len() != f.size {
        return Ok(false);
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => {
                hasher.update(&buf[..n]);
            }
        }
    }
    Ok(hasher.finalize().to_hex().as_str() == f.content_checksum())
}

/// Before a delta restore: removes what the backup does not have (files,
/// directories, links, the old WAL in pg_wal, postmaster.pid, signal
/// files) and `global/pg_control`, which is written last. Returns how many
/// entries went.
fn remove_extraneous(root: &Path, m: &Manifest) -> std::io::Result<usize> {
    let files: HashSet<&str> = m.files.iter().map(|f| f.path.as_str()).filter(|p| *p != "global/pg_control").collect();
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

/// One stored piece of a file: its whole content, or pages over the
/// layers before it.
#[derive(Debug, Clone)]
struct Layer {
    key: Option<String>,
    /// The bytes of a bundle that hold this layer.
    range: Option<std::ops::Range<u64>>,
    checksum: String,
    size: u64,
    delta: bool,
    compress: Compress,
}

/// The layers that rebuild `path` of `chain[0]`, oldest (a whole copy)
/// first.
fn layers(chain: &[Manifest], by_path: &[HashMap<&str, &FileEntry>], path: &str) -> Result<Vec<Layer>> {
    let mut out = Vec::new();
    for (b, files) in chain.iter().zip(by_path) {
        let Some(f) = files.get(path) else {
            return Err(Error::Corrupt(format!(
                "backup {} holds {path} as changes over backup {}, which does not have it; restore another backup",
                chain[0].label, b.label
            )));
        };
        out.push(Layer {
            key: f.key.clone(),
            range: f.offset.map(|o| o..o + f.repo_size),
            checksum: f.checksum.clone(),
            size: f.size,
            delta: f.delta,
            compress: b.compress,
        });
        if !f.delta {
            out.reverse();
            return Ok(out);
        }
    }
    Err(Error::Corrupt(format!("backup {} holds {path} as changes, but no backup of its chain holds the whole file", chain[0].label)))
}

fn tablespace_link<'a>(path: &str, map: &'a [(u32, PathBuf)]) -> Option<(u32, &'a PathBuf)> {
    let oid = path.strip_prefix("pg_tblspc/")?;
    map.iter().find(|(o, _)| o.to_string() == oid).map(|(o, d)| (*o, d))
}

/// Where a restore reads stored objects from, and how to decrypt them.
struct Source {
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Handle,
    cipher: Option<Cipher>,
    repo_no: usize,
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

/// Writes one file from its layers, checking every layer's checksum (and a
/// whole layer's size) as it is read, then cuts the file to its size.
fn restore_file(f: &FileEntry, layers: &[Layer], dest: &Path, source: &Source, progress: &Progress) -> Result<()> {
    let repo_no = source.repo_no;
    use std::os::unix::fs::FileExt;
    let out = std::fs::File::create(dest).map_err(Error::io(format!("cannot create {}", dest.display())))?;
    let write_err = Error::io(format!("cannot write {}", dest.display()));
    let mut buf = vec![0u8; 1 << 20];
    for layer in layers {
        let Some(key) = &layer.key else { continue };
        let object = format!("stored object '{key}' in repo {repo_no}");
        let corrupt = |e: std::io::Error| {
            if e.get_ref().is_some_and(|i| i.is::<object_store::Error>()) {
                Error::Io { what: format!("cannot read {object}"), cause: e }
            } else {
                Error::Corrupt(format!("{object} cannot be decompressed ({e}): it is corrupt or truncated; restore another backup"))
            }
        };
        let reader = ObjectReader::open(source.store.clone(), key, layer.range.clone(), source.rt.clone())
            .map_err(Error::storage(format!("cannot read {object}")))?;
        let dec = layer.compress.decoder(unsealing(source.cipher.as_ref(), reader).map_err(corrupt)?).map_err(corrupt)?;
        let mut src = Hashing { inner: dec, hasher: blake3::Hasher::new(), bytes: 0 };
        if layer.delta {
            while let Some(number) = pages::read_record(&mut src, &mut buf).map_err(corrupt)? {
                out.write_all_at(&buf, number as u64 * pages::PAGE_SIZE as u64)
                    .map_err(Error::io(format!("cannot write {}", dest.display())))?;
                progress.add_bytes(buf.len() as u64);
            }
        } else {
            let mut at = 0u64;
            loop {
                let n = src.read(&mut buf).map_err(corrupt)?;
                if n == 0 {
                    break;
                }
                out.write_all_at(&buf[..n], at).map_err(Error::io(format!("cannot write {}", dest.display())))?;
                at += n as u64;
                progress.add_bytes(n as u64);
            }
        }
        let whole_size_ok = layer.delta || src.bytes == layer.size;
        if !whole_size_ok || src.hasher.finalize().to_hex().as_str() != layer.checksum {
            return Err(Error::Corrupt(format!(
                "{object} fails its checksum (read {} bytes for {}): it is corrupt or truncated; restore another backup",
                src.bytes, f.path
            )));
        }
    }
    out.set_len(f.size).map_err(write_err)?;
    out.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(Error::io(format!("cannot set the mode of {}", dest.display())))?;
    out.sync_all().map_err(Error::io(format!("cannot sync {}", dest.display())))?;
    progress.file_done();
    Ok(())
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
    if let Some((key, value)) = target {
        lines.push(format!("{key} = {}", quote(&value)));
        if opts.exclusive && key != "recovery_target" {
            lines.push("recovery_target_inclusive = false".into());
        }
        lines.push(format!("recovery_target_action = {}", quote(opts.action.as_str())));
    }
    if let Some(tl) = &opts.timeline {
        lines.push(format!("recovery_target_timeline = {}", quote(tl)));
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
            !RECOVERY_KEYS.contains(&key) && !l.starts_with("# recovery settings written by pgkeep")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for l in recovery_settings(&m.label, opts) {
        text.push_str(&l);
        text.push('\n');
    }
    write_file(&auto, text.as_bytes())?;
    write_file(&root.join("recovery.signal"), b"")
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
    fn refuses_non_empty_directories_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_destination(&dir.path().join("new"), false).is_ok());
        assert!(check_destination(dir.path(), false).is_ok());
        std::fs::write(dir.path().join("PG_VERSION"), "15").unwrap();
        assert!(matches!(check_destination(dir.path(), false), Err(Error::Refused(_))));
        assert!(check_destination(dir.path(), true).is_ok());
        std::fs::write(dir.path().join("postmaster.pid"), format!("{}\n", std::process::id())).unwrap();
        let e = check_destination(dir.path(), true).unwrap_err().to_string();
        assert!(e.contains("is running"), "{e}");
    }
}
