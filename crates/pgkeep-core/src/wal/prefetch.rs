//! Asynchronous `archive-get`: recovery asks for one segment at a time and
//! waits for each; the prefetcher fetches the next ones (as many as
//! `archive-get-queue-max` holds, `jobs` at a time) into the spool while
//! PostgreSQL replays, so most requests are a rename.
//!
//! Only segments are prefetched: history, partial and backup files are
//! fetched when asked. A prefetched segment was read and checked against
//! its checksum like any other; one that is not there (yet) is fetched
//! directly, so the prefetcher only ever saves time, and "not in the
//! archive" is always the archive's own answer, never the spool's.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::spool::{Spool, Worker};
use super::tasks::NamedTasks;
use crate::error::{Error, OneLine, Result};
use crate::repo::Repository;
use crate::types::{WalFileName, WalSegment};
use crate::Stanza;

/// How long the prefetcher stays up once recovery stops asking.
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How soon a segment the archive did not have is asked for again.
const RETRY_MISSING: Duration = Duration::from_secs(1);

/// The foreground of asynchronous `archive-get`: takes the segment from the
/// spool when it was prefetched, else fetches it; then tells the
/// prefetcher (started with `start_worker` when none runs) where recovery
/// is.
pub async fn get(stanza: &Stanza, name: &str, dest: &std::path::Path, start_worker: &(dyn Fn() -> Result<()> + Send + Sync)) -> Result<()> {
    let wal = super::parse_get_name(name)?;
    if !matches!(wal, WalFileName::Segment(_)) {
        return super::get(stanza, name, dest).await;
    }
    let spool = Spool::open(stanza)?;
    if !spool.take_prefetched(name, dest)? {
        super::get(stanza, name, dest).await?;
    }
    spool.set_want(name)?;
    if !spool.running(Worker::Get)? {
        start_worker()?;
    }
    Ok(())
}

/// The prefetcher: runs while recovery keeps asking. Returns at once when
/// another one runs.
pub async fn worker(stanza: &Stanza) -> Result<()> {
    let spool = Spool::open(stanza)?;
    let Some(_lock) = spool.lock_worker(Worker::Get).await? else { return Ok(()) };
    // What an earlier prefetcher left may belong to another recovery.
    for name in spool.prefetched_names() {
        spool.drop_prefetched(&name);
    }
    let mut repos = Vec::new();
    for number in 1..=stanza.settings.repos.len() {
        match stanza.open(number).await {
            Ok(r) => repos.push(r),
            Err(e) => spool.log(Worker::Get, &format!("repo {number} is not used: {}", OneLine(&e))),
        }
    }
    let Some(first) = repos.first() else { return Ok(()) };
    let seg = first.system.wal_segment_size;
    let ahead = (stanza.settings.archive.get_queue_max / seg).max(1);
    let jobs = stanza.settings.jobs.max(1) * 2;
    let repos = std::sync::Arc::new(repos);
    spool.log(Worker::Get, &format!("started: {ahead} segments ahead, {jobs} at a time"));

    let mut want: Option<String> = None;
    let mut want_since = Instant::now();
    let mut missing: HashMap<String, Instant> = HashMap::new();
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    let mut tasks: NamedTasks<Result<()>> = NamedTasks::new();
    loop {
        while let Some((name, done)) = tasks.try_join_next() {
            note(name, done, &spool, &mut in_flight, &mut missing);
        }
        let now_want = spool.want();
        if now_want != want {
            want = now_want;
            want_since = Instant::now();
        } else if want_since.elapsed() >= IDLE_EXIT && in_flight.is_empty() {
            break;
        }
        if let Some(at) = want.as_deref().and_then(|w| WalSegment::parse(w, seg)) {
            let window: Vec<String> = (1..=ahead).map(|i| WalSegment { timeline: at.timeline, number: at.number + i }.name(seg)).collect();
            for held in spool.prefetched_names() {
                if !held.ends_with(".tmp") && !window.contains(&held) {
                    spool.drop_prefetched(&held);
                }
            }
            for name in window {
                if in_flight.len() >= jobs {
                    break;
                }
                let recently_missing = missing.get(&name).is_some_and(|t| t.elapsed() < RETRY_MISSING);
                if recently_missing || in_flight.contains(&name) || spool.prefetched(&name).exists() {
                    continue;
                }
                in_flight.insert(name.clone());
                let (repos, spool, fetched) = (repos.clone(), spool.clone(), name.clone());
                tasks.spawn(name, async move { fetch_into(&repos, &spool, &fetched).await });
            }
        }
        tokio::select! {
            Some((name, done)) = tasks.join_next(), if !tasks.is_empty() => note(name, done, &spool, &mut in_flight, &mut missing),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    spool.log(Worker::Get, "recovery stopped asking; stopping");
    Ok(())
}

/// Records a fetch task's end; one that panicked counts as a failed fetch
/// (logged, tried again later), so the worker still goes idle.
fn note(
    name: String,
    done: std::result::Result<Result<()>, tokio::task::JoinError>,
    spool: &Spool,
    in_flight: &mut BTreeSet<String>,
    missing: &mut HashMap<String, Instant>,
) {
    let result = done.unwrap_or_else(|e| Err(Error::task(format!("fetching {name}"))(e)));
    in_flight.remove(&name);
    match result {
        Ok(()) => {
            missing.remove(&name);
        }
        Err(e) => {
            if !matches!(e.kind(), Error::NotFound(_)) {
                spool.log(Worker::Get, &format!("{name}: {}", OneLine(&e)));
            }
            missing.insert(name, Instant::now());
        }
    }
}

/// Fetches `name` from the first repository that has it into the spool.
async fn fetch_into(repos: &[Repository], spool: &Spool, name: &str) -> Result<()> {
    let wal = WalFileName::Segment(name.to_owned());
    let mut last = None;
    for repo in repos {
        // The same check as a direct archive-get: a segment that is not
        // the asking system's is never put where recovery takes it.
        match repo.get_wal(&wal).await.and_then(|data| super::check_served(repo, &wal, &data).map(|()| data)) {
            Ok(data) => return spool.store_prefetched(name, &data),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::NotFound(format!("WAL file {name} is not in the archive"))))
}
