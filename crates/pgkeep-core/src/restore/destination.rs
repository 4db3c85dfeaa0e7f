//! Step 2 of a restore: check the destination (never a running cluster;
//! a non-empty directory only when asked; `--delta` only over the same
//! system) and prepare it.

use std::collections::HashSet;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::error::{Error, Hint, Opt, Result};
use crate::pg::CONTROL_FILE;
use crate::repo::{FileEntry, Manifest, Repository};

/// Where a delta restore keeps the old `pg_control` while it rewrites the
/// directory: not where PostgreSQL looks, so the directory does not start
/// half rewritten, but still there to show whose directory it is if the
/// restore must be run again.
pub(super) const DELTA_CONTROL: &str = "global/pg_control.pgkeep-delta";

/// `--delta` rewrites a directory in place, keeping files that match:
/// only one that is empty, or holds a data directory of the backup's own
/// system (`PG_VERSION`, and `global/pg_control` whose first field is the
/// system identifier), never anything else a mistyped path points at.
pub(super) fn check_delta_target(dir: &Path, m: &Manifest) -> Result<()> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(false) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot read {}", dir.display()))(e)),
        Ok(true) => {}
    }
    let refuse = |why: String| {
        Error::Refused(format!(
            "{} {why}, and a delta restore only rewrites a data directory of the same cluster; restore into an empty directory, or replace its contents",
            dir.display()
        ))
        .with_hint(Hint::retry(Opt::ForceInsteadOfDelta))
    };
    if !dir.join("PG_VERSION").is_file() {
        return Err(refuse("holds no PostgreSQL data directory (no PG_VERSION)".into()));
    }
    let control = [dir.join(CONTROL_FILE), dir.join(DELTA_CONTROL)].into_iter().find_map(|p| std::fs::read(p).ok());
    let Some(control) = control else { return Err(refuse("has no global/pg_control".into())) };
    match crate::pg::control_system_id(&control) {
        Some(id) if id == m.system_id => Ok(()),
        Some(id) => Err(refuse(format!("holds the data directory of another system ({id}, backup {} is of {})", m.label, m.system_id))),
        None => Err(refuse("has a truncated global/pg_control".into())),
    }
}

/// Refuses a running cluster always, and a non-empty directory unless
/// `force`; `what` follows the directory's name in the message, `hint`
/// says how to go on.
pub(super) fn check_destination(dir: &Path, force: bool, what: &str, hint: Hint) -> Result<()> {
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
            "{}{what} is not empty; restore into an empty or new directory, or replace its contents",
            dir.display()
        ))
        .with_hint(hint)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot read {}", dir.display()))(e)),
    }
}

/// Creates (or, forced, empties) the destinations; returns those to clear
/// again if the restore fails.
pub(super) fn prepare_dirs(plan: &Plan, force: bool) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![plan.pg_data.clone()];
    dirs.extend(plan.tablespaces.iter().map(|(_, d)| d.clone()));
    // 0700, or 0750 when the source allowed its group to read (initdb
    // --allow-group-access: its files are 0640), as PostgreSQL requires.
    // Its directories have the mode PostgreSQL gave them from the data
    // directory's (`pg_dir_create_mode`): `global`'s tells.
    let group = plan.chain[0].dirs.iter().any(|d| d.path == "global" && d.mode & 0o050 != 0);
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

pub(super) fn clear_dir(dir: &Path) -> std::io::Result<()> {
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

/// Removes what the backup `m` does not have from `root`: a walk of it in
/// list order (each directory's names sorted, tablespaces through their
/// links) read along `listed`, the backup's entries in the same order, so
/// that neither is held whole. Keeps the `pg_control` set aside. Returns
/// how many entries went.
pub(super) fn remove_extraneous(root: &Path, m: &Manifest, listed: impl Iterator<Item = Result<FileEntry>>) -> Result<usize> {
    let mut dirs: HashSet<&str> = m.dirs.iter().map(|d| d.path.as_str()).collect();
    dirs.extend(crate::pg::version::wal_dirs(m.pg_version));
    let mut walk = Sweep { root, dirs, listed: listed.peekable(), removed: 0 };
    walk.dir("")?;
    Ok(walk.removed)
}

/// The walk of [`remove_extraneous`].
struct Sweep<'a, I: Iterator<Item = Result<FileEntry>>> {
    root: &'a Path,
    dirs: HashSet<&'a str>,
    listed: std::iter::Peekable<I>,
    removed: usize,
}

impl<I: Iterator<Item = Result<FileEntry>>> Sweep<'_, I> {
    /// Whether the backup lists the file `path`, reading past the entries
    /// before it.
    fn listed(&mut self, path: &str) -> Result<bool> {
        Ok(crate::repo::filelist::entry_at(&mut self.listed, path)?.is_some())
    }

    fn dir(&mut self, rel: &str) -> Result<()> {
        let path = self.root.join(rel);
        let io = |what: &str, p: &Path| Error::io(format!("cannot {what} {}", p.display()));
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("read", &path))?;
            match entry.file_name().into_string() {
                Ok(name) => names.push(name),
                // Not a name PostgreSQL makes.
                Err(_) => {
                    remove(&entry.path()).map_err(io("remove", &entry.path()))?;
                    self.removed += 1;
                }
            }
        }
        names.sort_unstable();
        for name in names {
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let p = self.root.join(&child);
            let kind = std::fs::symlink_metadata(&p).map_err(io("read", &p))?.file_type();
            let is_dir = kind.is_dir() || (kind.is_symlink() && p.is_dir());
            if is_dir && self.dirs.contains(child.as_str()) {
                self.dir(&child)?;
            } else if kind.is_file() && (child == DELTA_CONTROL || (child != CONTROL_FILE && self.listed(&child)?)) {
                continue;
            } else {
                remove(&p).map_err(io("remove", &p))?;
                self.removed += 1;
            }
        }
        Ok(())
    }
}

/// Removes a file, a link, or a directory and what it holds.
fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p)?.is_dir() {
        true => std::fs::remove_dir_all(p),
        false => std::fs::remove_file(p),
    }
}

/// Before a delta restore rewrites `root`: sets `pg_control` aside (the
/// directory must not start while it is half rewritten; the copy still
/// shows whose directory it is if the restore must run again), then
/// removes what the backup `m` does not have. Returns how many entries
/// went.
pub(super) async fn clear_for_delta(repo: &Repository, root: &Path, m: &Manifest) -> Result<usize> {
    match std::fs::rename(root.join(CONTROL_FILE), root.join(DELTA_CONTROL)) {
        Ok(()) => super::files::sync_dir(&root.join("global"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot move {} aside", root.join(CONTROL_FILE).display()))(e)),
    }
    let (repo, root, m) = (repo.clone(), root.to_path_buf(), m.clone());
    tokio::task::spawn_blocking(move || remove_extraneous(&root, &m, repo.file_reader(&m)?))
        .await
        .map_err(Error::task("a delta restore's clean-up"))?
}

/// Once the backup's `pg_control` is in place: the old one set aside by
/// [`clear_for_delta`] goes, and `global/` is synced.
pub(super) fn done_with_delta(root: &Path, delta: bool) -> Result<()> {
    if delta {
        let _ = std::fs::remove_file(root.join(DELTA_CONTROL));
    }
    super::files::sync_dir(&root.join("global"))
}

/// Checks the `global/pg_control` just written: the control file of the
/// backup's major (its version and CRC) and system. A
/// backup whose control file is not (damaged, or recorded under the wrong
/// major) must not start: the file is removed, and the directory with it
/// will not start until a restore completes.
pub(super) fn check_control(root: &Path, m: &Manifest) -> Result<()> {
    let path = root.join(CONTROL_FILE);
    let control = std::fs::read(&path).map_err(Error::io(format!("cannot read {}", path.display())))?;
    // A backup recorded under a major pgkeep does not know (taken before it
    // checked) is not judged.
    let Ok(major) = crate::pg::version::of_version(m.pg_version) else { return Ok(()) };
    let problem = if crate::pg::version::control_is_valid(&control, major) {
        (crate::pg::control_system_id(&control) != Some(m.system_id)).then(|| format!("is not of system {}, the backup's", m.system_id))
    } else {
        Some(match crate::pg::version::of_control_file(&control) {
            Some(other) => format!("is PostgreSQL {}'s, but the backup was taken of PostgreSQL {}", other.major, major.major),
            None => format!("is not a valid PostgreSQL {} control file (by its version and CRC)", major.major),
        })
    };
    let Some(problem) = problem else { return Ok(()) };
    std::fs::remove_file(&path).map_err(Error::io(format!("cannot remove {}", path.display())))?;
    Err(Error::Corrupt(format!(
        "the global/pg_control restored from backup {} {problem}; the backup is damaged: run verify, and restore another backup",
        m.label
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::BackupType;
    use crate::types::SystemId;

    /// A restored control file must be the backup's major's and system's:
    /// one of another major (PostgreSQL 17's file in a backup recorded as
    /// 15's), of another system, or torn is refused and removed, so the
    /// directory cannot start.
    #[test]
    fn a_restored_control_file_of_another_major_or_system_is_refused_and_removed() {
        let control = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/pg/testdata/pg_control.16")).unwrap();
        let system = crate::pg::control_system_id(&control).unwrap();
        // (15's and 16's control files differ only by catalog version,
        // which betas move: not told apart here.)
        let seventeen = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/pg/testdata/pg_control.17")).unwrap();
        let seventeen_system = crate::pg::control_system_id(&seventeen).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("global")).unwrap();
        let write = |bytes: &[u8]| std::fs::write(dir.path().join(CONTROL_FILE), bytes).unwrap();
        let mut m = Manifest::for_test("20261201-120000F", BackupType::Full, None, chrono::Utc::now(), 1000, (0, 0));
        (m.pg_version, m.system_id) = (160014, system);

        write(&control);
        check_control(dir.path(), &m).unwrap();

        for (pg_version, system_id, bytes, says) in [
            (150018, seventeen_system, seventeen.clone(), "is PostgreSQL 17's, but the backup was taken of PostgreSQL 15"),
            (160014, SystemId(system.0 + 1), control.clone(), "is not of system"),
            (160014, system, [&control[..20], &[!control[20]], &control[21..]].concat(), "is not a valid PostgreSQL 16 control file"),
        ] {
            (m.pg_version, m.system_id) = (pg_version, system_id);
            write(&bytes);
            let e = check_control(dir.path(), &m).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("run verify"), "{e}");
            assert!(!dir.path().join(CONTROL_FILE).exists(), "a refused control file was left in place");
        }
    }
}
