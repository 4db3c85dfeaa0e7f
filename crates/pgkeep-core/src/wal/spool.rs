//! The local spool of asynchronous archiving, `<spool-path>/<stanza>/`:
//!
//! - `out/<wal>.ok`, `out/<wal>.error`: what the push worker did with a
//!   file PostgreSQL marked ready; `archive-push` waits for one and removes
//!   it. An `.ok` names the file it is for (device, inode, size, mtime),
//!   so a stale one never acknowledges another file of the same name.
//! - `queue/repo<N>/<wal>`: copies of WAL kept for repository N while it is
//!   down, delivered in name order once it answers again.
//! - `in/<wal>`: segments `archive-get` fetched ahead of recovery;
//!   `in/want` names the last segment recovery took.
//! - `push.lock`, `get.lock`: held (flock) by the running worker;
//!   `push.log`, `get.log`: the workers' logs.
//!
//! Every file is written whole (temporary file, rename), so a worker
//! killed at any instant leaves no half file under a real name; queued WAL
//! is also fsynced, as it may be the only copy on its way to a repository.
//! The spool holds copies of WAL: its files are created `rw-r-----` and
//! its directories `rwxr-x---` at most, whatever the umask.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::Stanza;

/// The mode the spool's files are created with (the umask may narrow it).
const FILE_MODE: u32 = 0o640;
/// The mode the spool's directories are created with.
const DIR_MODE: u32 = 0o750;

/// Creates `dir` and its missing parents, each with [`DIR_MODE`].
fn create_dirs(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens (creating with [`FILE_MODE`]) a file to append to.
fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(path)
}

/// The spool directory of one stanza.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// Where prefetched segments go: `in/`, or `in-<system id>/` for the
    /// recovery of a system the stanza names (after `stanza-upgrade`, two
    /// systems have segments of the same names with other contents, so
    /// the prefetcher of one never hands its files to the other).
    incoming: PathBuf,
    /// `""`, or `-<system id>`: the prefetcher's lock goes with its
    /// directory.
    system: String,
}

/// Which worker a lock or log belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Worker {
    /// The archive-push worker.
    Push,
    /// The archive-get prefetcher.
    Get,
}

impl Worker {
    fn name(self) -> &'static str {
        match self {
            Worker::Push => "push",
            Worker::Get => "get",
        }
    }
}

/// The push worker's answer for one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledged {
    /// The file that was stored: device, inode, size and mtime.
    pub file: String,
    /// Lines PostgreSQL's log should show (a repository down, a segment
    /// not queued).
    pub warnings: Vec<String>,
}

/// A status file taken from `out/`.
#[derive(Debug)]
pub enum Status {
    /// Stored in every repository that is up.
    Ok(Acknowledged),
    /// Not stored; the one-line reason.
    Failed(String),
}

/// The held lock of a worker; released on drop (and by the kernel when the
/// process dies).
#[derive(Debug)]
pub struct WorkerLock {
    _file: File,
}

impl Spool {
    /// The spool of `stanza`, created if needed.
    pub fn open(stanza: &Stanza) -> Result<Spool> {
        let root = &stanza.settings.archive.spool;
        let dir = root.join(stanza.name());
        let system = stanza.wal_system.map(|id| format!("-{id}")).unwrap_or_default();
        let incoming = format!("in{system}");
        for sub in ["out", "queue", incoming.as_str()] {
            create_dirs(&dir.join(sub)).map_err(|e| {
                Error::Input(format!(
                    "cannot use spool-path {}: {e}; create it, writable by the user PostgreSQL runs as, or set spool-path",
                    root.display()
                ))
            })?;
        }
        Ok(Spool { incoming: dir.join(&incoming), dir, system })
    }

    /// The stanza's spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn out(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.join("out").join(format!("{name}.{ext}"))
    }

    /// Records that `name` is stored.
    pub fn acknowledge(&self, name: &str, ack: &Acknowledged) -> Result<()> {
        let _ = fs::remove_file(self.out(name, "error"));
        write_whole(&self.out(name, "ok"), &serde_json::to_vec(ack).expect("serialisable"), false)
    }

    /// Records that `name` could not be stored, and why.
    pub fn fail(&self, name: &str, why: &str) -> Result<()> {
        write_whole(&self.out(name, "error"), why.as_bytes(), false)
    }

    /// Whether a status for `name` is waiting.
    pub fn has_status(&self, name: &str) -> bool {
        self.out(name, "ok").exists() || self.out(name, "error").exists()
    }

    /// Takes (reads and removes) the status of `name`, if any.
    pub fn take_status(&self, name: &str) -> Result<Option<Status>> {
        let ok = self.out(name, "ok");
        if let Some(bytes) = read_if_exists(&ok)? {
            let _ = fs::remove_file(&ok);
            // An unreadable .ok acknowledges nothing: the worker pushes again.
            return Ok(serde_json::from_slice(&bytes).ok().map(Status::Ok));
        }
        let err = self.out(name, "error");
        if let Some(bytes) = read_if_exists(&err)? {
            let _ = fs::remove_file(&err);
            return Ok(Some(Status::Failed(String::from_utf8_lossy(&bytes).trim().to_owned())));
        }
        Ok(None)
    }

    /// Removes status files of WAL no longer waiting (`keep` says which
    /// names are still ready) and temporary files left by other processes
    /// (this one's are being written).
    pub fn clean_statuses(&self, keep: impl Fn(&str) -> bool) {
        let mine = format!(".{}.tmp", std::process::id());
        for (path, file) in entries(&self.dir.join("out")) {
            if file.ends_with(".tmp") {
                if !file.ends_with(&mine) {
                    let _ = fs::remove_file(path);
                }
                continue;
            }
            let name = file.rsplit_once('.').map_or(file.as_str(), |(n, _)| n);
            if !keep(name) {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// The queue directory of repository `number`.
    pub fn queue(&self, number: usize) -> PathBuf {
        self.dir.join("queue").join(format!("repo{number}"))
    }

    /// The WAL files queued for repository `number`, by name, with sizes.
    pub fn queued(&self, number: usize) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = entries(&self.queue(number))
            .into_iter()
            .filter(|(_, f)| !f.ends_with(".tmp"))
            .map(|(p, f)| (f, fs::metadata(p).map(|m| m.len()).unwrap_or(0)))
            .collect();
        out.sort();
        out
    }

    /// Keeps a copy of `name` for repository `number`.
    pub fn enqueue(&self, number: usize, name: &str, data: &[u8]) -> Result<()> {
        let dir = self.queue(number);
        create_dirs(&dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
        write_durably(&dir.join(name), data)
    }

    /// Reads a queued copy.
    pub fn read_queued(&self, number: usize, name: &str) -> Result<Vec<u8>> {
        let p = self.queue(number).join(name);
        fs::read(&p).map_err(Error::io(format!("cannot read {}", p.display())))
    }

    /// Removes a delivered copy.
    pub fn dequeue(&self, number: usize, name: &str) {
        let _ = fs::remove_file(self.queue(number).join(name));
    }

    /// Where a prefetched segment lives.
    pub fn prefetched(&self, name: &str) -> PathBuf {
        self.incoming.join(name)
    }

    /// Names of the prefetched segments.
    pub fn prefetched_names(&self) -> Vec<String> {
        entries(&self.incoming).into_iter().map(|(_, f)| f).filter(|f| f != "want").collect()
    }

    /// Removes a prefetched segment (or a temporary file).
    pub fn drop_prefetched(&self, name: &str) {
        let _ = fs::remove_file(self.prefetched(name));
    }

    /// Stores a fetched segment under `in/`.
    pub fn store_prefetched(&self, name: &str, data: &[u8]) -> Result<()> {
        write_whole(&self.prefetched(name), data, false)
    }

    /// Moves prefetched segment `name` to `dest`; false when it is not
    /// there.
    pub fn take_prefetched(&self, name: &str, dest: &Path) -> Result<bool> {
        let src = self.prefetched(name);
        match fs::rename(&src, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            // Another file system: copy.
            Err(_) => {
                let Some(data) = read_if_exists(&src)? else { return Ok(false) };
                write_durably(dest, &data)?;
                let _ = fs::remove_file(&src);
                return Ok(true);
            }
        }
        if let Some(dir) = dest.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(true)
    }

    /// Records the last segment recovery took, for the prefetcher.
    pub fn set_want(&self, name: &str) -> Result<()> {
        write_whole(&self.incoming.join("want"), name.as_bytes(), false)
    }

    /// The last segment recovery took.
    pub fn want(&self) -> Option<String> {
        fs::read_to_string(self.incoming.join("want")).ok().map(|s| s.trim().to_owned())
    }

    /// Takes the lock of `worker` if no one holds it.
    pub fn try_lock(&self, worker: Worker) -> Result<Option<WorkerLock>> {
        let path = match worker {
            Worker::Get => self.dir.join(format!("get{}.lock", self.system)),
            Worker::Push => self.dir.join("push.lock"),
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(Error::io(format!("cannot open {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(WorkerLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(format!("cannot lock {}", path.display()))(e)),
        }
    }

    /// Takes the lock of `worker`, waiting a moment for it: a foreground
    /// checking whether a worker runs holds it for an instant. `None` when
    /// another worker holds it.
    pub async fn lock_worker(&self, worker: Worker) -> Result<Option<WorkerLock>> {
        for _ in 0..10 {
            if let Some(l) = self.try_lock(worker)? {
                return Ok(Some(l));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(None)
    }

    /// Whether a worker holds its lock.
    pub fn running(&self, worker: Worker) -> Result<bool> {
        Ok(self.try_lock(worker)?.is_none())
    }

    /// The log file of `worker`.
    pub fn log_path(&self, worker: Worker) -> PathBuf {
        self.dir.join(format!("{}.log", worker.name()))
    }

    /// The log file of `worker`, opened to append (created if needed):
    /// what a starting worker's own output goes to.
    pub fn open_log(&self, worker: Worker) -> std::io::Result<File> {
        open_append(&self.log_path(worker))
    }

    /// Appends a time-stamped line to the log of `worker`.
    pub fn log(&self, worker: Worker, line: &str) {
        let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.3f");
        if let Ok(mut f) = self.open_log(worker) {
            let _ = writeln!(f, "{now} [{}] {line}", std::process::id());
        }
    }
}

/// Writes `data` to `path` whole: a temporary file beside it (created
/// `rw-r-----` at most), fsynced, renamed over `path`, and the directory
/// fsynced.
pub fn write_durably(path: &Path, data: &[u8]) -> Result<()> {
    write_whole(path, data, true)
}

/// Writes `data` to `path` whole (a temporary file beside it, renamed),
/// and with `sync` durably. Statuses and prefetched WAL need no fsync: a
/// crash loses them, and they are made again (a status by storing the file
/// again, which finds it archived).
fn write_whole(path: &Path, data: &[u8], sync: bool) -> Result<()> {
    let what = || format!("cannot write {}", path.display());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if let (true, Some(dir)) = (sync, path.parent()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(what())(e)
    })
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()))(e)),
    }
}

fn entries(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok()).filter_map(|e| Some((e.path(), e.file_name().into_string().ok()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(root: &Path) -> Spool {
        let dir = root.join("s");
        for sub in ["out", "queue", "in"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Spool { incoming: dir.join("in"), dir, system: String::new() }
    }

    /// After stanza-upgrade two systems have segments of the same names:
    /// what is prefetched for the recovery of one is never handed to the
    /// other, and each has its own prefetcher.
    #[test]
    fn prefetched_segments_of_one_system_are_not_seen_by_the_recovery_of_another() {
        let t = tempfile::tempdir().unwrap();
        let text = format!("[stanza.demo]\npg-data = \"/x\"\nspool-path = \"{}\"\n[[repo]]\nlocation = \"/r\"\n", t.path().display());
        let file = crate::config::ConfigFile::parse(&text).unwrap();
        let settings = crate::config::Settings::resolve(&file, Some("demo"), Default::default(), Default::default(), 1).unwrap();
        let stanza = Stanza::new(settings);
        let old = Spool::open(&stanza.clone().serving_system(Some(crate::types::SystemId(7)))).unwrap();
        let new = Spool::open(&stanza.serving_system(Some(crate::types::SystemId(8)))).unwrap();
        let name = "000000010000000000000009";
        old.store_prefetched(name, b"old system").unwrap();
        old.set_want(name).unwrap();
        let dest = t.path().join("dest");
        assert!(!new.take_prefetched(name, &dest).unwrap() && new.want().is_none());
        assert!(new.prefetched_names().is_empty());
        let _held = old.try_lock(Worker::Get).unwrap().expect("free");
        assert!(!new.running(Worker::Get).unwrap(), "one system's prefetcher keeps the other's from starting");
        assert!(old.take_prefetched(name, &dest).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"old system");
    }

    #[test]
    fn a_status_is_taken_once_and_an_error_is_replaced_by_an_ok() {
        let t = tempfile::tempdir().unwrap();
        let s = spool(t.path());
        let name = "000000010000000000000003";
        assert!(s.take_status(name).unwrap().is_none());
        s.fail(name, "repo 1: down").unwrap();
        let ack = Acknowledged { file: "1:2:3:4.5".into(), warnings: vec!["w".into()] };
        s.acknowledge(name, &ack).unwrap();
        match s.take_status(name).unwrap() {
            Some(Status::Ok(a)) => assert_eq!(a, ack),
            other => panic!("{other:?}"),
        }
        assert!(s.take_status(name).unwrap().is_none(), "taken once");
        s.fail(name, "repo 1: down\n").unwrap();
        assert!(matches!(s.take_status(name).unwrap(), Some(Status::Failed(m)) if m == "repo 1: down"));
    }

    #[test]
    fn cleaning_keeps_waiting_statuses_and_this_process_temporary_files() {
        let t = tempfile::tempdir().unwrap();
        let s = spool(t.path());
        let ack = Acknowledged { file: "f".into(), warnings: vec![] };
        s.acknowledge("000000010000000000000001", &ack).unwrap();
        s.fail("000000010000000000000002", "down").unwrap();
        let out = s.dir.join("out");
        let mine = out.join(format!("000000010000000000000003.ok.{}.tmp", std::process::id()));
        let dead = out.join("000000010000000000000004.ok.1.tmp");
        fs::write(&mine, b"x").unwrap();
        fs::write(&dead, b"x").unwrap();
        s.clean_statuses(|n| n == "000000010000000000000002");
        assert!(mine.exists(), "a file this process is writing must stay");
        assert!(!dead.exists() && !s.has_status("000000010000000000000001"));
        assert!(s.has_status("000000010000000000000002"));
    }

    #[test]
    fn the_queue_lists_in_name_order_without_temporary_files() {
        let t = tempfile::tempdir().unwrap();
        let s = spool(t.path());
        s.enqueue(2, "000000010000000000000005", b"b").unwrap();
        s.enqueue(2, "000000010000000000000004", b"aa").unwrap();
        fs::write(s.queue(2).join("000000010000000000000006.7.tmp"), b"x").unwrap();
        assert_eq!(s.queued(2), vec![("000000010000000000000004".into(), 2), ("000000010000000000000005".into(), 1)]);
        assert!(s.queued(1).is_empty());
        s.dequeue(2, "000000010000000000000004");
        assert_eq!(s.queued(2).len(), 1);
    }

    /// Whatever the umask lets through (0022 here), what the spool and
    /// its workers create is at most rw-r----- and directories rwxr-x---.
    #[test]
    fn spool_files_and_directories_are_created_at_most_0640_and_0750() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let text = format!(
            "[stanza.demo]\npg-data = \"/nonexistent\"\narchive-async = true\nspool-path = \"{}/spool/deep\"\n\n[[repo]]\nlocation = \"/nonexistent\"\n",
            t.path().display()
        );
        let file = crate::config::ConfigFile::parse(&text).unwrap();
        let settings = crate::config::Settings::resolve(&file, Some("demo"), Default::default(), Default::default(), 1).unwrap();
        let s = Spool::open(&Stanza::new(settings)).unwrap();
        s.acknowledge("000000010000000000000001", &Acknowledged { file: "f".into(), warnings: vec![] }).unwrap();
        s.fail("000000010000000000000002", "down").unwrap();
        s.enqueue(2, "000000010000000000000003", b"wal").unwrap();
        s.store_prefetched("000000010000000000000004", b"wal").unwrap();
        s.set_want("000000010000000000000004").unwrap();
        drop(s.try_lock(Worker::Push).unwrap());
        s.log(Worker::Push, "started");
        drop(s.open_log(Worker::Get).unwrap());
        write_durably(&t.path().join("spool/deep/restored"), b"wal").unwrap();

        let mut seen = 0;
        let mut todo = vec![t.path().join("spool")];
        while let Some(dir) = todo.pop() {
            for e in fs::read_dir(&dir).unwrap().flatten() {
                let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
                if e.file_type().unwrap().is_dir() {
                    assert!(mode & !0o750 == 0, "directory {} was created {mode:o}, wider than 750", e.path().display());
                    todo.push(e.path());
                } else {
                    assert!(mode & !0o640 == 0, "file {} was created {mode:o}, wider than 640", e.path().display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 14, "only {seen} entries");
    }

    #[test]
    fn a_worker_lock_is_exclusive_until_dropped() {
        let t = tempfile::tempdir().unwrap();
        let s = spool(t.path());
        let held = s.try_lock(Worker::Push).unwrap().expect("free");
        assert!(s.running(Worker::Push).unwrap());
        assert!(!s.running(Worker::Get).unwrap());
        drop(held);
        assert!(!s.running(Worker::Push).unwrap());
    }
}
