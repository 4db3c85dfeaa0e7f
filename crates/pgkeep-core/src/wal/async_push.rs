//! Asynchronous `archive-push`.
//!
//! PostgreSQL's archiver runs `archive_command` for one file at a time, so a
//! store that takes 100 ms per segment caps archiving at 10 segments/s. In
//! asynchronous mode `archive-push` only waits for a background worker:
//! the worker reads PostgreSQL's own queue (`pg_wal/archive_status/*.ready`)
//! and stores up to `jobs` files at once, each in every repository at once,
//! and writes a status file per file into the spool (see [`super::spool`]).
//!
//! What acknowledging a file to PostgreSQL means, exactly: the file is
//! stored in every repository that is up, and in at least one. A
//! repository that fails is marked down; the file is kept for it in the
//! spool queue and delivered, in order, once it answers again, while the
//! others carry on without waiting for it. `archive-push-queue-max` bounds
//! that queue: past it the down repository misses segments (logged, and
//! reported by `verify` as a gap) rather than filling the primary's disk.
//! With no limit nothing is ever skipped. When no repository can take a
//! file, nothing is acknowledged and PostgreSQL keeps it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::spool::{Acknowledged, Spool, Status, Worker};
use super::tasks::NamedTasks;
use crate::error::{Error, OneLine, Result};
use crate::repo::Repository;
use crate::types::WalFileName;
use crate::Stanza;

/// How long the worker stays up with nothing to do.
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How often a down repository is tried again.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How soon a file that failed everywhere is tried again.
const RETRY_FAILED: Duration = Duration::from_secs(1);
/// How long a stored file is not stored again while PostgreSQL still
/// lists it as ready (it marks it done once `archive-push` returns).
const RECENTLY_STORED: Duration = Duration::from_secs(10);

/// Which file an acknowledgement is for: device, inode, size and
/// modification time as the worker read it. PostgreSQL never changes a
/// segment once it is marked ready, and recycles segments under new names,
/// so a file that still matches is the one that was stored.
fn fingerprint(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}:{}:{}:{}.{}", meta.dev(), meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec())
}

/// Whether `path` can go through the worker: it must sit in a `pg_wal`
/// with PostgreSQL's `archive_status` queue and be marked ready there.
fn ready_in_queue(path: &Path, name: &str) -> bool {
    let dir = std::path::absolute(path).ok().and_then(|p| p.parent().map(Path::to_path_buf));
    dir.is_some_and(|d| d.join("archive_status").join(format!("{name}.ready")).exists())
}

/// The foreground of asynchronous `archive-push`: waits until the worker
/// reports on `path`, starting it (`start_worker`) when none runs. Returns
/// the warnings PostgreSQL's log should show. Falls back to pushing
/// directly for a file outside PostgreSQL's queue.
pub async fn push(stanza: &Stanza, path: &Path, start_worker: &(dyn Fn() -> Result<()> + Send + Sync)) -> Result<Vec<String>> {
    let name = super::parse_name(path)?;
    if !ready_in_queue(path, name.as_str()) {
        super::push(stanza, path).await?;
        return Ok(Vec::new());
    }
    let spool = Spool::open(stanza)?;
    let timeout = Duration::from_secs(stanza.settings.archive_timeout.max(1));
    let deadline = Instant::now() + timeout;
    let mut next_check = Instant::now();
    loop {
        match spool.take_status(name.as_str())? {
            Some(Status::Ok(ack)) => {
                let meta = std::fs::metadata(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
                if ack.file == fingerprint(&meta) {
                    return Ok(ack.warnings);
                }
                // A stale acknowledgement of another file of that name:
                // removed, so the worker stores this one.
            }
            Some(Status::Failed(why)) => return Err(Error::Refused(why)),
            None => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Refused(format!(
                "{} was not archived within {}s (archive-timeout); see {}",
                name.as_str(),
                timeout.as_secs(),
                spool.log_path(Worker::Push).display()
            )));
        }
        if now >= next_check {
            if !spool.running(Worker::Push)? {
                start_worker()?;
            }
            next_check = now + Duration::from_millis(250);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One repository as the worker sees it.
#[derive(Debug)]
struct Lane {
    number: usize,
    repo: Option<Repository>,
    /// Why it is down; `None` while it answers.
    down: Option<String>,
    /// Names and sizes queued for it, in order.
    queued: Vec<(String, u64)>,
    /// Segments it missed because the queue was full, since it went down.
    skipped: u64,
    last_probe: Instant,
    draining: bool,
}

impl Lane {
    /// Whether the worker must try it again: it is down, or has WAL
    /// queued. The worker stays up while a queue waits, so a queue also
    /// makes it try: the loop never waits for what it does not act on
    /// (files are queued only while the lane is down, see [`keep_for`]).
    fn needs_drain(&self) -> bool {
        self.down.is_some() || !self.queued.is_empty()
    }
}

struct Shared {
    stanza: Stanza,
    wal_dir: PathBuf,
    spool: Spool,
    lanes: Vec<Mutex<Lane>>,
    queue_max: Option<u64>,
}

/// The worker: runs until there has been nothing to do for a few seconds
/// and no repository has a queue. Returns at once when another worker runs.
pub async fn worker(stanza: &Stanza, wal_path: &Path) -> Result<()> {
    let spool = Spool::open(stanza)?;
    let Some(_lock) = spool.lock_worker(Worker::Push).await? else { return Ok(()) };
    let wal_dir = std::path::absolute(wal_path).map_err(Error::io("cannot resolve the WAL directory"))?;
    let wal_dir = if wal_dir.is_dir() { wal_dir } else { wal_dir.parent().map(Path::to_path_buf).unwrap_or(wal_dir) };
    spool.log(Worker::Push, &format!("started for {}", wal_dir.display()));
    let mut lanes = Vec::new();
    for number in 1..=stanza.settings.repos.len() {
        let queued = spool.queued(number);
        let (repo, down) = match stanza.open(number).await {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(OneLine(&e).to_string())),
        };
        // A queue left by an earlier worker keeps the repository in queue
        // mode until it is delivered, so that order is kept.
        let down = down.or_else(|| (!queued.is_empty()).then(|| "it has WAL queued from before".to_owned()));
        if let Some(why) = &down {
            spool.log(Worker::Push, &format!("repo {number} is down: {why}"));
        }
        let last_probe = Instant::now() - PROBE_EVERY;
        lanes.push(Mutex::new(Lane { number, repo, down, queued, skipped: 0, last_probe, draining: false }));
    }
    if lanes.iter().all(|l| l.lock().expect("lane").repo.is_none()) {
        // Nothing to store into: report it for what is waiting, and let
        // PostgreSQL retry.
        let why = lanes.iter().filter_map(|l| l.lock().expect("lane").down.clone()).collect::<Vec<_>>().join("; ");
        for name in ready_files(&wal_dir) {
            spool.fail(&name, &format!("{name} cannot be archived: no repository answers ({why}); PostgreSQL keeps it and retries"))?;
        }
        return Ok(());
    }
    let shared = Arc::new(Shared { stanza: stanza.clone(), wal_dir, spool, lanes, queue_max: stanza.settings.archive.push_queue_max });
    run(shared).await
}

async fn run(shared: Arc<Shared>) -> Result<()> {
    let jobs = shared.stanza.settings.jobs.max(1) * 2;
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    let mut tasks: NamedTasks<bool> = NamedTasks::new();
    let mut drains: JoinSet<()> = JoinSet::new();
    // Files recently finished, and when: PostgreSQL may not have marked a
    // file done yet when the next scan sees it ready.
    let mut finished: Finished = HashMap::new();
    let mut idle_since = Instant::now();
    let mut cleaned = Instant::now() - Duration::from_secs(60);
    loop {
        while let Some((name, done)) = tasks.try_join_next() {
            finish(&shared, name, done, &mut in_flight, &mut finished);
        }
        while let Some(done) = drains.try_join_next() {
            if let Err(e) = done {
                shared.spool.log(Worker::Push, &OneLine(&Error::task("a queue delivery")(e)).to_string());
            }
        }
        if !shared.wal_dir.join("archive_status").is_dir() {
            shared.spool.log(Worker::Push, "the WAL directory is gone; stopping");
            break;
        }
        let ready = ready_files(&shared.wal_dir);
        if cleaned.elapsed() > Duration::from_secs(2) {
            let waiting: BTreeSet<&str> = ready.iter().map(String::as_str).collect();
            shared.spool.clean_statuses(|n| waiting.contains(n));
            cleaned = Instant::now();
        }
        let mut pending = false;
        for name in &ready {
            if in_flight.contains(name) {
                continue;
            }
            if in_flight.len() >= jobs {
                pending = true;
                break;
            }
            let wait = match finished.get(name) {
                Some((at, true)) => at.elapsed() < RECENTLY_STORED,
                Some((at, false)) => at.elapsed() < RETRY_FAILED,
                None => false,
            };
            if wait {
                pending = true;
                continue;
            }
            if shared.spool.has_status(name) {
                continue;
            }
            in_flight.insert(name.clone());
            let (s, n) = (shared.clone(), name.clone());
            tasks.spawn(name.clone(), async move { store_one(&s, &n).await });
        }
        let mut queued = false;
        for lane in &shared.lanes {
            let mut l = lane.lock().expect("lane");
            queued |= !l.queued.is_empty();
            if l.needs_drain() && !l.draining && l.last_probe.elapsed() >= PROBE_EVERY {
                l.draining = true;
                l.last_probe = Instant::now();
                let (s, number) = (shared.clone(), l.number);
                drains.spawn(async move { drain(&s, number).await });
            }
        }
        if pending || queued || !in_flight.is_empty() || !drains.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= IDLE_EXIT {
            break;
        }
        finished.retain(|_, (at, _)| at.elapsed() < RECENTLY_STORED);
        tokio::select! {
            Some((name, done)) = tasks.join_next(), if !tasks.is_empty() => finish(&shared, name, done, &mut in_flight, &mut finished),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    while tasks.join_next().await.is_some() {}
    drains.abort_all();
    shared.spool.log(Worker::Push, "idle; stopping");
    Ok(())
}

type Finished = HashMap<String, (Instant, bool)>;

/// Records an upload task's end. One that panicked fails its file (its
/// status says why, and `archive-push` reports it to PostgreSQL, which
/// tries again), so that the worker still goes idle.
fn finish(
    s: &Shared,
    name: String,
    done: std::result::Result<bool, tokio::task::JoinError>,
    in_flight: &mut BTreeSet<String>,
    finished: &mut Finished,
) {
    let stored = done.unwrap_or_else(|e| {
        let err = Error::task(format!("the upload of {name}"))(e);
        let _ = s.spool.fail(&name, &OneLine(&err).to_string());
        s.spool.log(Worker::Push, &format!("{name}: {}", OneLine(&err)));
        false
    });
    in_flight.remove(&name);
    finished.insert(name, (Instant::now(), stored));
}

/// Names of the files PostgreSQL has marked ready, in name order
/// (timeline history files sort first, as PostgreSQL archives them).
fn ready_files(wal_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(wal_dir.join("archive_status")) else { return Vec::new() };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".ready").map(str::to_owned))
        .filter(|n| WalFileName::parse(n).is_some())
        .collect();
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    names
}

/// What became of one file in one repository.
enum Outcome {
    Stored,
    /// The repository is down (now or already): queue it there.
    Down,
    /// The file itself is refused (another cluster's WAL, a different file
    /// under that name): never queued, PostgreSQL keeps it.
    Refused(Error),
}

/// Stores one ready file in every repository and writes its status;
/// whether it was stored.
async fn store_one(s: &Shared, name: &str) -> bool {
    match try_store_one(s, name).await {
        Ok(()) => true,
        Err(e) => {
            let _ = s.spool.fail(name, &OneLine(&e).to_string());
            s.spool.log(Worker::Push, &format!("{name}: {}", OneLine(&e)));
            false
        }
    }
}

async fn try_store_one(s: &Shared, name: &str) -> Result<()> {
    let path = s.wal_dir.join(name);
    let wal = super::parse_name(&path)?;
    let what = || format!("cannot read {}", path.display());
    let meta = std::fs::metadata(&path).map_err(Error::io(what()))?;
    let data = Arc::new(std::fs::read(&path).map_err(Error::io(what()))?);
    let up: Vec<Option<Repository>> =
        s.lanes.iter().map(|lane| lane.lock().expect("lane")).map(|l| if l.down.is_some() { None } else { l.repo.clone() }).collect();
    // Compressed once per codec and level, off the runtime's threads.
    let codecs: Vec<super::Codec> = up.iter().flatten().map(|r| codec_of(s, r)).collect();
    let packed = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || {
            let mut p = super::Packed::default();
            for (c, level) in codecs {
                p.get(c, level, &data)?;
            }
            Ok::<_, Error>(p)
        })
        .await
        .map_err(Error::task(format!("compressing {name}")))??
    };
    let attempts = s.lanes.iter().zip(up).map(|(lane, repo)| {
        let (wal, data, path, packed) = (&wal, &data, &path, &packed);
        async move {
            let Some(repo) = repo else { return Outcome::Down };
            let (c, level) = codec_of(s, &repo);
            let bytes = packed.find(c, level).expect("compressed above");
            let stored = async {
                let repo = checked(s, lane, repo, wal, data, path).await?;
                repo.push_packed_wal(wal, data, c, &bytes).await
            };
            match stored.await {
                Ok(_) => Outcome::Stored,
                Err(e) if e.retryable() => {
                    mark_down(s, lane, &e);
                    Outcome::Down
                }
                Err(e) => Outcome::Refused(e),
            }
        }
    });
    let mut outcomes = futures::future::join_all(attempts).await;
    if let Some(i) = outcomes.iter().position(|o| matches!(o, Outcome::Refused(_))) {
        let Outcome::Refused(e) = outcomes.swap_remove(i) else { unreachable!("matched above") };
        return Err(e);
    }
    let stored = outcomes.iter().filter(|o| matches!(o, Outcome::Stored)).count();
    if stored == 0 {
        let why: Vec<String> = s
            .lanes
            .iter()
            .map(|l| l.lock().expect("lane"))
            .map(|l| format!("repo {}: {}", l.number, l.down.clone().unwrap_or_default()))
            .collect();
        return Err(Error::Refused(format!(
            "{name} cannot be archived: no repository answers ({}); PostgreSQL keeps it and retries",
            why.join("; ")
        )));
    }
    let mut warnings = Vec::new();
    for (lane, outcome) in s.lanes.iter().zip(&outcomes) {
        if matches!(outcome, Outcome::Down) {
            warnings.extend(keep_for(s, lane, name, &data).await?);
        }
    }
    s.spool.acknowledge(name, &Acknowledged { file: fingerprint(&meta), warnings })
}

/// Codec and level of a repository.
fn codec_of(s: &Shared, repo: &Repository) -> super::Codec {
    let opts = &s.stanza.settings.repos[repo.number - 1];
    (opts.compress.unwrap_or_default(), opts.compress_level)
}

/// Stores a queued file (compressed here: the queue is the rare path);
/// `repo` has passed [`checked`].
async fn store_in(s: &Shared, repo: &Repository, wal: &WalFileName, data: &[u8]) -> Result<()> {
    let (c, level) = codec_of(s, repo);
    repo.push_wal(wal, data, c, level).await?;
    Ok(())
}

/// Where a queued file goes. It was accepted when it was queued: a
/// segment of a system the stanza has replaced since (queued before
/// `stanza-upgrade` reached this repository) goes to that system's
/// archive, where it belongs; anything else as [`checked`] says.
async fn queued_into(s: &Shared, lane: &Mutex<Lane>, repo: Repository, wal: &WalFileName, data: &[u8], path: &Path) -> Result<Repository> {
    let of = match wal {
        WalFileName::Segment(_) | WalFileName::Partial(_) => crate::pg::wal_system_id(data),
        _ => None,
    };
    if let Some(id) = of.filter(|id| *id != repo.system.system_id) {
        let fresh = s.stanza.open(repo.number).await?;
        if let Ok(old) = fresh.for_system(id, "the queued file") {
            if old.meta.current().system_id != id && data.len() as u64 == old.system.wal_segment_size {
                return Ok(old);
            }
        }
    }
    checked(s, lane, repo, wal, data, path).await
}

/// `repo` when it takes `wal` (of its stanza's current system, of the
/// right size); else the repository read again, which the lane keeps, when
/// that takes it: `stanza-upgrade` may have recorded a new system since
/// the worker opened it (after `pg_upgrade`, PostgreSQL retries the
/// refused file until it has run).
async fn checked(s: &Shared, lane: &Mutex<Lane>, repo: Repository, wal: &WalFileName, data: &[u8], path: &Path) -> Result<Repository> {
    let Err(refused) = super::check_wal_file(&repo, wal, data, path) else { return Ok(repo) };
    let fresh = s.stanza.open(repo.number).await?;
    if fresh.meta == repo.meta {
        return Err(refused);
    }
    lane.lock().expect("lane").repo = Some(fresh.clone());
    super::check_wal_file(&fresh, wal, data, path)?;
    Ok(fresh)
}

/// Marks a repository down after a store error.
fn mark_down(s: &Shared, lane: &Mutex<Lane>, e: &Error) {
    let mut l = lane.lock().expect("lane");
    if l.down.is_none() {
        s.spool.log(Worker::Push, &format!("repo {} is down: {}", l.number, OneLine(e)));
        l.down = Some(OneLine(e).to_string());
        l.last_probe = Instant::now();
    }
}

/// Keeps `name`, which this upload found down, for the repository of
/// `lane`; returns the line for PostgreSQL's log, if any.
///
/// The upload saw the repository down when it started, but it may have
/// come back since: its queue delivered and the lane marked up by a drain
/// that will not look again. So whether to queue is decided anew, under
/// the lane's lock: the file is queued only while the lane is still down
/// (then a drain is coming for it), and a repository that is up again
/// gets the file now.
async fn keep_for(s: &Shared, lane: &Mutex<Lane>, name: &str, data: &[u8]) -> Result<Option<String>> {
    loop {
        let repo = {
            let mut l = lane.lock().expect("lane");
            match (l.down.is_none(), l.repo.clone()) {
                (true, Some(repo)) => repo,
                _ => return queue_for(s, &mut l, name, data).map(Some),
            }
        };
        let path = s.wal_dir.join(name);
        let wal = super::parse_name(&path)?;
        let stored = async { store_in(s, &checked(s, lane, repo.clone(), &wal, data, &path).await?, &wal, data).await };
        match stored.await {
            Ok(()) => {
                let number = repo.number;
                s.spool.log(
                    Worker::Push,
                    &format!("{name}: repo {number} came back while it was stored elsewhere; stored in repo {number} now"),
                );
                return Ok(None);
            }
            // Down again: queued on the next turn.
            Err(e) if e.retryable() => mark_down(s, lane, &e),
            Err(e) => return Err(e),
        }
    }
}

/// Keeps `name` for a down repository, within the queue limit; returns the
/// line for PostgreSQL's log.
///
/// Over the limit the queue keeps the oldest WAL, so that the repository
/// misses one run of segments, not scattered ones: files stored at once
/// reach this point in any order, and an older one takes the place of the
/// newest queued one. Called with the lane's lock held, the lane down.
fn queue_for(s: &Shared, l: &mut Lane, name: &str, data: &[u8]) -> Result<String> {
    let number = l.number;
    let why = l.down.clone().unwrap_or_default();
    if l.queued.iter().any(|(n, _)| n == name) {
        return Ok(format!("repo {number} is down ({why}); {name} is already queued for it"));
    }
    let size = data.len() as u64;
    let full = |q: &[(String, u64)]| s.queue_max.is_some_and(|max| q.iter().map(|(_, b)| b).sum::<u64>() + size > max);
    while full(&l.queued) && l.queued.last().is_some_and(|(newest, _)| newest.as_str() > name) {
        let (evicted, _) = l.queued.pop().expect("non-empty");
        s.spool.dequeue(number, &evicted);
        l.skipped += 1;
        s.spool.log(
            Worker::Push,
            &format!("repo {number}'s queue is full: {evicted} is NOT kept for repo {number}; the older {name} takes its place"),
        );
    }
    if full(&l.queued) {
        l.skipped += 1;
        let line = format!(
            "repo {number} is down ({why}) and its queue is full (archive-push-queue-max): {name} is NOT kept for repo {number}, which will have a gap in its archive ({} segments missed so far); the other repositories have it",
            l.skipped
        );
        s.spool.log(Worker::Push, &line);
        return Ok(line);
    }
    s.spool.enqueue(number, name, data)?;
    l.queued.push((name.to_owned(), size));
    l.queued.sort();
    let bytes: u64 = l.queued.iter().map(|(_, b)| b).sum();
    Ok(format!(
        "repo {number} is down ({why}); {name} is queued for it in {} ({} files, {} MiB)",
        s.spool.queue(number).display(),
        l.queued.len(),
        bytes >> 20
    ))
}

/// Tries a down repository again: delivers its queue in order, then marks
/// it up. Stops at the first failure (tried again later).
async fn drain(s: &Shared, number: usize) {
    let lane = &s.lanes[number - 1];
    let result = drain_queue(s, lane, number).await;
    let mut l = lane.lock().expect("lane");
    l.draining = false;
    l.last_probe = Instant::now();
    match result {
        Ok(skipped) => {
            let note = if skipped > 0 { format!("; it missed {skipped} segments while its queue was full") } else { String::new() };
            s.spool.log(Worker::Push, &format!("repo {number} is up again and its queue is delivered{note}"));
        }
        Err(e) => {
            l.down = Some(OneLine(&e).to_string());
        }
    }
}

/// Delivers the queue; once it is empty and the repository answers, marks
/// the lane up and returns how many segments it missed while its queue
/// was full.
async fn drain_queue(s: &Shared, lane: &Mutex<Lane>, number: usize) -> Result<u64> {
    let opened = lane.lock().expect("lane").repo.clone();
    let repo = match opened {
        Some(r) => r,
        None => {
            let r = s.stanza.open(number).await?;
            lane.lock().expect("lane").repo = Some(r.clone());
            r
        }
    };
    // A repository with nothing queued is probed with a cheap read.
    let nothing_queued = lane.lock().expect("lane").queued.is_empty();
    if nothing_queued {
        repo.find_wal(&WalFileName::History("00000001.history".into())).await?;
    }
    loop {
        let next = {
            let mut l = lane.lock().expect("lane");
            match l.queued.first() {
                Some((n, _)) => n.clone(),
                // Found empty and marked up under one lock: a file is
                // queued only while the lane is down, so none is left
                // behind, and new files go straight to it now.
                None => {
                    l.down = None;
                    return Ok(std::mem::take(&mut l.skipped));
                }
            }
        };
        let data = s.spool.read_queued(number, &next)?;
        let path = s.spool.queue(number).join(&next);
        let wal = super::parse_name(&path)?;
        // A file this repository does not take yet (its stanza has not
        // recorded the system after pg_upgrade) waits in the queue, which
        // stays; only a refusal of the store itself drops it.
        let repo = queued_into(s, lane, repo.clone(), &wal, &data, &path).await?;
        match store_in(s, &repo, &wal, &data).await {
            Ok(()) => {}
            Err(e) if e.retryable() => return Err(e),
            Err(e) => {
                // Refused for good (a different file under that name is
                // there): keeping it would block the queue forever.
                s.spool.log(Worker::Push, &format!("repo {number} refuses queued {next}, dropped from its queue: {}", OneLine(&e)));
            }
        }
        s.spool.dequeue(number, &next);
        lane.lock().expect("lane").queued.retain(|(n, _)| n != &next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigFile, Settings};
    use crate::repo::StanzaMeta;

    /// A worker's state over two local repositories (both up) and an empty
    /// PostgreSQL queue, in `dir`. Timeline history files stand for WAL:
    /// they are stored like segments, without a cluster's page headers.
    async fn shared(dir: &Path) -> Arc<Shared> {
        let wal_dir = dir.join("pg_wal");
        std::fs::create_dir_all(wal_dir.join("archive_status")).unwrap();
        let text = format!(
            "[stanza.demo]\npg-data = \"{d}/pgdata\"\narchive-async = true\nspool-path = \"{d}/spool\"\n\n\
             [[repo]]\nlocation = \"{d}/repo1\"\n\n[[repo]]\nlocation = \"{d}/repo2\"\ncompress = \"none\"\n",
            d = dir.display()
        );
        let file = ConfigFile::parse(&text).unwrap();
        let stanza = Stanza::new(Settings::resolve(&file, Some("demo"), Default::default(), Default::default(), 1).unwrap());
        let meta = StanzaMeta::for_test(1);
        let mut lanes = Vec::new();
        for number in 1..=2 {
            let (repo, _) = Repository::create(&stanza.store(number).unwrap(), meta.clone(), number, None).await.unwrap();
            let last_probe = Instant::now();
            lanes.push(Mutex::new(Lane {
                number,
                repo: Some(repo),
                down: None,
                queued: Vec::new(),
                skipped: 0,
                last_probe,
                draining: false,
            }));
        }
        let spool = Spool::open(&stanza).unwrap();
        Arc::new(Shared { stanza, wal_dir, spool, lanes, queue_max: None })
    }

    fn history(timeline: u32) -> (String, Vec<u8>) {
        (format!("{timeline:08X}.history"), format!("{}\t0/{timeline}000000\tno recovery target specified\n", timeline - 1).into_bytes())
    }

    /// Makes repository 2 an in-memory one whose failures the test
    /// injects.
    async fn faulty_repo_2(s: &Shared) -> Arc<crate::storage::testing::Faulty> {
        let faulty = crate::storage::testing::Faulty::new(Arc::new(object_store::memory::InMemory::new()));
        let store = crate::storage::Store::from_object_store(faulty.clone(), "faulty://");
        let meta = s.lanes[0].lock().expect("lane").repo.as_ref().unwrap().meta.clone();
        let (repo, _) = Repository::create(&store, meta, 2, None).await.unwrap();
        s.lanes[1].lock().expect("lane").repo = Some(repo);
        faulty
    }

    async fn in_repo(s: &Shared, number: usize, name: &str) -> bool {
        let repo = s.lanes[number - 1].lock().expect("lane").repo.clone().expect("opened");
        !repo.find_wal(&WalFileName::parse(name).unwrap()).await.unwrap().is_empty()
    }

    /// Issue 10: an upload that found repository 2 down (and stored its
    /// file in repository 1 only) ends after the worker delivered repo 2's
    /// queue and marked it up. The file it keeps for repo 2 must still
    /// reach repo 2, and the worker must then go idle: it used to be
    /// queued for a repository that was up, where no drain ever looked
    /// (drains are for down repositories) while the worker waited for
    /// that queue forever.
    #[tokio::test]
    async fn a_file_kept_by_an_upload_that_outlived_the_outage_reaches_the_repository_and_the_worker_goes_idle() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path()).await;
        let lane = &s.lanes[1];
        let (early, early_data) = history(2);
        let (late, late_data) = history(3);

        // Repo 2 is down; an earlier upload queued its file for it.
        lane.lock().expect("lane").down = Some("unwritable".into());
        assert!(keep_for(&s, lane, &early, &early_data).await.unwrap().is_some_and(|w| w.contains("is queued for it")));
        // An upload starts and finds repo 2 down. Meanwhile repo 2
        // answers: its queue is delivered and it is up again.
        drain(&s, 2).await;
        assert!(lane.lock().expect("lane").down.is_none(), "repo 2 should be up once its queue is delivered");
        assert!(in_repo(&s, 2, &early).await);
        // The upload ends and keeps its file for repo 2.
        keep_for(&s, lane, &late, &late_data).await.unwrap();

        let limit = Duration::from_secs(60);
        let ran = tokio::time::timeout(limit, run(s.clone())).await;
        let (queued, down) = {
            let l = lane.lock().expect("lane");
            (l.queued.clone(), l.down.clone())
        };
        assert!(
            ran.is_ok(),
            "the worker did not go idle within {limit:?}: {queued:?} queued for repo 2 (down: {down:?}), on disk {:?}",
            s.spool.queued(2)
        );
        assert!(s.spool.queued(2).is_empty() && queued.is_empty(), "{queued:?} {:?}", s.spool.queued(2));
        assert!(in_repo(&s, 2, &late).await, "{late} never reached repo 2");
    }

    /// A WAL segment of system `id`: 16 MiB starting with a long page
    /// header (`xlp_info` with XLP_LONG_HEADER, `xlp_sysid` at 24) of the
    /// major the tests record for it: 15 for system 1 (`StanzaMeta::for_test`),
    /// 18 for the system [`record_system`] adds.
    fn segment_of_system(id: u64) -> Vec<u8> {
        let mut data = vec![0u8; 16 << 20];
        let major = if id == 1 { 15 } else { 18 };
        data[..2].copy_from_slice(&crate::pg::version::of_major(major).unwrap().wal_page_magic.to_le_bytes());
        data[2..4].copy_from_slice(&2u16.to_le_bytes());
        data[24..32].copy_from_slice(&id.to_le_bytes());
        data
    }

    /// What `stanza-upgrade` writes in repository `number`: system `id`
    /// recorded as the current one.
    async fn record_system(s: &Shared, number: usize, id: u64) {
        let repo = s.stanza.open(number).await.unwrap();
        let meta = repo.meta.upgraded(crate::types::SystemId(id), 180000, 16 << 20, chrono::Utc::now());
        repo.store().put(crate::repo::keys::STANZA, crate::repo::manifest::seal(&meta), false).await.unwrap();
    }

    /// Issue 11: after `pg_upgrade`, a worker that opened the repositories
    /// before `stanza-upgrade` must take the new system's WAL once it has
    /// run (PostgreSQL retries the refused file meanwhile), and a file
    /// queued for a repository that has not recorded the new system yet
    /// must wait in its queue, not be dropped as refused for good.
    #[tokio::test]
    async fn a_worker_opened_before_stanza_upgrade_takes_the_new_system_after_it_and_a_queue_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path()).await;
        let name = "000000010000000000000009";
        std::fs::write(s.wal_dir.join(name), segment_of_system(2)).unwrap();

        // Before stanza-upgrade: refused everywhere, nothing stored.
        assert!(!store_one(&s, name).await, "a segment of an unrecorded system was accepted");
        assert!(!in_repo(&s, 1, name).await && !in_repo(&s, 2, name).await);

        // stanza-upgrade reached repo 1; repo 2 is down meanwhile.
        record_system(&s, 1, 2).await;
        s.lanes[1].lock().expect("lane").down = Some("unreachable".into());
        assert!(store_one(&s, name).await, "repo 1 recorded the system: the file is archived there");
        assert!(in_repo(&s, 1, name).await);
        assert_eq!(s.spool.queued(2).len(), 1, "the file is queued for repo 2");

        // Repo 2 answers but has not recorded the system: the file waits.
        drain(&s, 2).await;
        let down = s.lanes[1].lock().expect("lane").down.clone();
        assert!(down.as_deref().is_some_and(|d| d.contains("must record the new system")), "{down:?}");
        assert_eq!(s.spool.queued(2).len(), 1, "a file repo 2 does not take yet was dropped from its queue");

        // Once it has: delivered.
        record_system(&s, 2, 2).await;
        drain(&s, 2).await;
        assert!(s.lanes[1].lock().expect("lane").down.is_none());
        assert!(s.spool.queued(2).is_empty() && in_repo(&s, 2, name).await);
    }

    /// A segment of the old system queued for a repository while it was
    /// down, just before pg_upgrade, is delivered to that system's archive
    /// once the repository answers, even when stanza-upgrade reached it
    /// first and the worker has read the stanza since: it was accepted when
    /// it was queued, and must neither block the queue nor be dropped.
    #[tokio::test]
    async fn a_segment_queued_before_stanza_upgrade_reaches_its_own_systems_archive() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path()).await;
        let name = "000000010000000000000005";
        std::fs::write(s.wal_dir.join(name), segment_of_system(1)).unwrap();
        s.lanes[1].lock().expect("lane").down = Some("unreachable".into());
        assert!(store_one(&s, name).await);
        assert_eq!(s.spool.queued(2).len(), 1);

        record_system(&s, 2, 2).await;
        let fresh = s.stanza.open(2).await.unwrap();
        assert_eq!(fresh.system.system_id, crate::types::SystemId(2));
        s.lanes[1].lock().expect("lane").repo = Some(fresh.clone());
        drain(&s, 2).await;
        let down = s.lanes[1].lock().expect("lane").down.clone();
        assert!(down.is_none() && s.spool.queued(2).is_empty(), "the queue is stuck: {down:?}");
        let old = fresh.for_system(crate::types::SystemId(1), "test").unwrap();
        assert_eq!(old.find_wal(&WalFileName::parse(name).unwrap()).await.unwrap().len(), 1, "not in the old system's archive");
        assert!(fresh.find_wal(&WalFileName::parse(name).unwrap()).await.unwrap().is_empty(), "stored in the new system's archive");
    }

    /// Issue 11: an upload task that panics (a bug, simulated by a store
    /// that panics on the write) must not keep its file "in flight"
    /// forever: the file is failed with an internal error, which
    /// `archive-push` hands to PostgreSQL, and the worker goes idle.
    #[tokio::test]
    async fn an_upload_that_panics_fails_its_file_and_the_worker_still_goes_idle() {
        use crate::storage::testing::{Fault, Op, Rule};
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path()).await;
        let faulty = faulty_repo_2(&s).await;
        let (name, data) = history(2);
        std::fs::write(s.wal_dir.join(&name), &data).unwrap();
        std::fs::write(s.wal_dir.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
        faulty.set(vec![Rule::new(Op::Put, &name, Fault::Panic)]);

        let limit = Duration::from_secs(60);
        let ran = tokio::time::timeout(limit, run(s.clone())).await;
        assert!(ran.is_ok(), "the worker did not go idle within {limit:?} after an upload panicked");
        match s.spool.take_status(&name).unwrap() {
            Some(Status::Failed(why)) => assert!(why.contains("internal error") && why.contains("panicked"), "{why}"),
            other => panic!("the file of the panicked upload has status {other:?}"),
        }
    }

    /// Issue 11: repository 2 down, up, down and up again, on the paused
    /// clock (every probe and wait happens in virtual time). Each file
    /// PostgreSQL hands over is acknowledged while repository 2 is down
    /// (stored in repository 1, queued for 2), the queue reaches repository
    /// 2 each time it answers again, and the worker then goes idle.
    #[tokio::test(start_paused = true)]
    async fn a_repository_down_up_down_and_up_again_gets_every_file_and_the_worker_goes_idle() {
        use crate::storage::testing::{Fault, Op, Rule};
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path()).await;
        let faulty = faulty_repo_2(&s).await;
        let status = s.wal_dir.join("archive_status");
        // PostgreSQL's side: a file made ready, then its acknowledgement
        // awaited (in virtual time) and the file marked done.
        let hand_over = |timeline: u32| {
            let (name, data) = history(timeline);
            std::fs::write(s.wal_dir.join(&name), &data).unwrap();
            std::fs::write(status.join(format!("{name}.ready")), b"").unwrap();
            name
        };
        let acknowledged = |name: String| {
            let (s, status) = (s.clone(), status.clone());
            async move {
                for _ in 0..6000 {
                    match s.spool.take_status(&name).unwrap() {
                        Some(Status::Ok(ack)) => {
                            std::fs::rename(status.join(format!("{name}.ready")), status.join(format!("{name}.done"))).unwrap();
                            return ack.warnings;
                        }
                        Some(Status::Failed(why)) => panic!("{name} failed: {why}"),
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                panic!("{name} was not acknowledged in 10 minutes of virtual time");
            }
        };
        let until = |what: &'static str, cond: Box<dyn Fn() -> bool>| async move {
            for _ in 0..6000 {
                if cond() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{what}: not within 10 minutes of virtual time");
        };
        let down = |s: &Arc<Shared>| s.lanes[1].lock().expect("lane").down.is_some();
        let worker = tokio::spawn(run(s.clone()));

        let mut names = Vec::new();
        for round in 0..2u32 {
            faulty.set(vec![Rule::new(Op::Any, "", Fault::Fail)]);
            for k in 0..3 {
                let name = hand_over(2 + round * 3 + k);
                let warnings = acknowledged(name.clone()).await;
                assert!(
                    warnings.iter().any(|w| w.contains("repo 2")),
                    "round {round}: {name} acknowledged without a word on repo 2: {warnings:?}"
                );
                assert!(in_repo(&s, 1, &name).await);
                names.push(name);
            }
            assert!(down(&s), "round {round}: repo 2 should be down");
            faulty.clear();
            let s2 = s.clone();
            until("repo 2 up with its queue delivered", Box::new(move || !down(&s2) && s2.spool.queued(2).is_empty())).await;
            for name in &names {
                assert!(in_repo(&s, 2, name).await, "round {round}: {name} never reached repo 2");
            }
        }
        let ran = tokio::time::timeout(Duration::from_secs(600), worker).await;
        assert!(ran.is_ok(), "the worker did not go idle once everything was delivered");
    }
}
