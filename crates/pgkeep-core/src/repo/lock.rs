//! The stanza lock of a repository: one backup or expire at a time, across
//! machines, on any store with put-if-absent.
//!
//! The lock is a series of generations, `lock/<n>.json`; the highest one
//! is the lock. To take it, a process lists `lock/`, and if the highest
//! generation's holder is alive it refuses; otherwise (none, released, or
//! its holder dead) it creates generation `n + 1` with put-if-absent. Of
//! processes racing for the same generation exactly one succeeds, so a
//! lock left by a killed process is taken over safely without deleting it
//! first. The winner reads its generation back (a store that ignores
//! put-if-absent then shows the other writer's nonce, and the loser
//! refuses), then lists again: a higher generation there means that a
//! process which listed later already won, and this one steps back. Only
//! then does it delete the generations below its own. Releasing marks the
//! generation released instead of deleting it, so the highest number only
//! ever grows: a generation number is never handed out twice, whatever
//! the timing (a process that listed long ago and creates a number deleted
//! since sees the higher one when it lists again).
//!
//! A holder is alive while:
//! - on this machine (same boot and PID namespace): its process runs and
//!   is the same process, told by its start time in `/proc/PID/stat`, and
//!   is not a zombie: a killed process that no parent reaps, or a pid
//!   reused by another process, is dead; this process itself is alive, so
//!   two tasks of one long-running process exclude each other too;
//! - elsewhere (another machine, or another container with its own PID
//!   namespace, whatever its host name): it refreshed the lock (every 30
//!   s) in the last two minutes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Repository;
use crate::error::{Error, Result};

const DIR: &str = super::keys::LOCK_DIR;
const REFRESH: Duration = Duration::from_secs(30);
/// A holder on another machine silent for longer is taken for dead.
const REMOTE_STALE_SECS: i64 = 120;

/// Who holds the lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Holder {
    /// What runs: `backup` or `expire`.
    pub command: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// When it took the lock.
    pub since: DateTime<Utc>,
    /// When it last refreshed it.
    pub updated: DateTime<Utc>,
    /// Tells this holder from any other.
    pub nonce: String,
    /// The machine and PID namespace it runs in (boot id and namespace),
    /// within which its pid means something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Its process's start time (clock ticks after boot, `/proc/PID/stat`
    /// field 22): a reused pid has another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<u64>,
    /// It let the lock go.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl Holder {
    fn me(command: &str) -> Holder {
        let mut nonce = [0u8; 16];
        let _ = getrandom::fill(&mut nonce);
        Holder {
            command: command.to_owned(),
            host: host_name(),
            pid: std::process::id(),
            since: Utc::now(),
            updated: Utc::now(),
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            machine: machine(),
            started: process_state(std::process::id()).map(|(_, started)| started),
            released: false,
        }
    }

    /// Whether the holder may still be running (see the module doc).
    pub fn alive(&self, now: DateTime<Utc>) -> bool {
        if self.released {
            return false;
        }
        let here = match (&self.machine, machine()) {
            (Some(theirs), Some(ours)) => *theirs == ours,
            // Written before holders named their machine: the host name.
            (None, _) => self.host == host_name(),
            (Some(_), None) => false,
        };
        if !here {
            return (now - self.updated).num_seconds() < REMOTE_STALE_SECS;
        }
        // The same process holds it when the start time matches, this one
        // included (two tasks of one long-running process exclude each
        // other too); a holder that recorded no start time and has this
        // process's pid was an earlier process.
        match (process_state(self.pid), self.started) {
            (None, _) => false,
            (Some((state, _)), _) if state == 'Z' || state == 'X' => false,
            (Some((_, started)), Some(recorded)) => started == recorded,
            (Some(_), None) => self.pid != std::process::id(),
        }
    }
}

/// This machine's host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// This boot of this machine and this PID namespace: where a pid names
/// one process.
fn machine() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), ns.to_string_lossy()))
}

/// A process's state letter and start time from `/proc/PID/stat`; `None`
/// when there is no such process.
fn process_state(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// State (field 3) and start time (field 22) of a `/proc/PID/stat` line;
/// the command (field 2) may hold spaces and parentheses, so fields are
/// counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let started = fields.get(19)?.parse().ok()?;
    Some((state, started))
}

/// A held lock; call [`StanzaLock::release`] when done. Dropped without
/// release (a panic), it is left for the next process to take over once
/// this one has exited.
pub struct StanzaLock {
    repo: Repository,
    key: String,
    /// This holder, and whether it was released: the refresher writes only
    /// while holding this, so no refresh lands after the release.
    state: Arc<tokio::sync::Mutex<Holder>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl StanzaLock {
    /// Takes the lock for `command`, or refuses naming who holds it.
    pub async fn acquire(repo: &Repository, command: &str) -> Result<StanzaLock> {
        let (generations, holder) = newest(repo).await?;
        StanzaLock::claim(repo, command, generations.iter().copied().max().unwrap_or(0), holder).await
    }

    /// Takes the lock after a listing that found generation `top` (0: none)
    /// held by `holder`: the second half of [`StanzaLock::acquire`], apart
    /// so that tests can interleave other processes between the two.
    async fn claim(repo: &Repository, command: &str, top: u64, holder: Option<Holder>) -> Result<StanzaLock> {
        if let Some(h) = holder.filter(|h| h.alive(Utc::now())) {
            return Err(busy(repo, &h));
        }
        let mut me = Holder::me(command);
        let mine = top + 1;
        let next = key(mine);
        let lost = || {
            Error::Refused(format!(
                "another process took the lock of stanza '{}' in repo {} just now; run {command} again when it is done",
                repo.meta.stanza, repo.number
            ))
        };
        if !repo.put_metadata(&next, &me, true).await? {
            return Err(lost());
        }
        let what = format!("lock of stanza '{}' in repo {}", repo.meta.stanza, repo.number);
        match repo.get_metadata::<Holder>(&next, &what).await? {
            Some(h) if h.nonce == me.nonce => {}
            Some(h) => return Err(busy(repo, &h)),
            None => return Err(Error::Refused(format!("{what} vanished as it was taken; run {command} again"))),
        }
        let (generations, _) = newest(repo).await?;
        if generations.iter().any(|g| *g > mine) {
            me.released = true;
            let _ = repo.put_metadata(&next, &me, false).await;
            return Err(lost());
        }
        let older: Vec<String> = generations.iter().filter(|g| **g < mine).map(|g| key(*g)).collect();
        let _ = repo.store().delete_all(older).await;
        let state = Arc::new(tokio::sync::Mutex::new(me));
        let refresher = {
            let (repo, next, state) = (repo.clone(), next.clone(), state.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    let mut me = state.lock().await;
                    if me.released {
                        return;
                    }
                    me.updated = Utc::now();
                    let _ = repo.put_metadata(&next, &*me, false).await;
                }
            })
        };
        Ok(StanzaLock { repo: repo.clone(), key: next, state, refresher })
    }

    /// Releases the lock: marks its generation released (never deletes it:
    /// see the module doc).
    pub async fn release(self) -> Result<()> {
        let mut me = self.state.lock().await;
        me.released = true;
        self.refresher.abort();
        self.repo.put_metadata(&self.key, &*me, false).await.map(|_| ())
    }
}

impl StanzaLock {
    /// Stops refreshing without writing anything: for `stanza-delete`,
    /// which deletes the lock objects with the rest of the stanza.
    pub async fn forget(self) {
        self.state.lock().await.released = true;
        self.refresher.abort();
    }
}

impl Drop for StanzaLock {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Who holds the lock now, if anyone alive does (for `info`).
pub async fn holder(repo: &Repository) -> Result<Option<Holder>> {
    Ok(newest(repo).await?.1.filter(|h| h.alive(Utc::now())))
}

/// The lock objects that cannot be read (for `verify`), one line each. A
/// damaged generation names no live holder, so the next backup or expire
/// takes the lock over and deletes it; it is still a damaged object.
pub async fn damaged(repo: &Repository) -> Result<Vec<String>> {
    let (generations, _) = newest(repo).await?;
    let mut out = Vec::new();
    for g in generations {
        let what = format!("lock object {} of stanza '{}' in repo {}", key(g), repo.meta.stanza, repo.number);
        if let Err(e) = repo.get_metadata::<Holder>(&key(g), &what).await {
            out.push(format!("{}; the next backup or expire replaces it", crate::error::OneLine(&e)));
        }
    }
    Ok(out)
}

/// The generations of the lock, and the holder of the newest one.
async fn newest(repo: &Repository) -> Result<(Vec<u64>, Option<Holder>)> {
    let listed = repo.store().list(DIR).await?;
    let generations: Vec<u64> = listed.iter().filter_map(|l| l.key.strip_suffix(".json")?.parse().ok()).collect();
    let top = generations.iter().copied().max().unwrap_or(0);
    let what = format!("lock of stanza '{}' in repo {}", repo.meta.stanza, repo.number);
    // A damaged lock object cannot name a live holder.
    let holder = if top > 0 { repo.get_metadata::<Holder>(&key(top), &what).await.ok().flatten() } else { None };
    Ok((generations, holder))
}

fn key(generation: u64) -> String {
    super::keys::lock(generation)
}

fn busy(repo: &Repository, h: &Holder) -> Error {
    Error::Refused(format!(
        "{} is running on stanza '{}' in repo {} (pid {} on {}, since {}); wait for it to finish",
        h.command,
        repo.meta.stanza,
        repo.number,
        h.pid,
        h.host,
        h.since.format("%Y-%m-%d %H:%M:%S UTC")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_alive_while_its_process_runs_or_refreshes() {
        let now = Utc::now();
        let mut h = Holder::me("backup");
        h.pid = u32::MAX - 1;
        assert!(!h.alive(now), "no such process");
        h.pid = std::process::id();
        assert!(h.alive(now), "this very process holds it");
        h.started = None;
        assert!(!h.alive(now), "a holder of old with this pid was an earlier process");
        h.machine = Some("another-machine".into());
        assert!(h.alive(now));
        assert!(!h.alive(now + chrono::Duration::seconds(REMOTE_STALE_SECS + 1)));
        h.released = true;
        assert!(!h.alive(now), "released");
    }

    #[test]
    fn a_reused_pid_or_a_zombie_is_not_the_holder() {
        // A live process of this machine: our parent (the test harness).
        let parent = std::os::unix::process::parent_id();
        let (state, started) = process_state(parent).expect("the parent runs");
        let mut h = Holder::me("backup");
        h.pid = parent;
        h.started = Some(started);
        assert!(state != 'Z' && h.alive(Utc::now()));
        h.started = Some(started + 1);
        assert!(!h.alive(Utc::now()), "another process under the same pid");
        // The same process seen from another PID namespace: only the
        // refresh counts, whatever the host name.
        h.machine = Some("other-boot/pid:[1]".into());
        h.updated = Utc::now() - chrono::Duration::seconds(REMOTE_STALE_SECS + 1);
        assert!(!h.alive(Utc::now()));

        let zombie = "4242 (pgkeep) Z 1 4242 4242 0 -1 4228173 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_stat(zombie), Some(('Z', 987654)));
        let odd = "77 (a) b (c)) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 123 0 0";
        assert_eq!(parse_stat(odd), Some(('S', 123)), "a command with spaces and parentheses");
        assert_eq!(parse_stat("garbage"), None);
    }

    async fn repo(dir: &std::path::Path) -> Repository {
        let opts = crate::config::RepoOptions { location: Some(dir.to_str().unwrap().into()), ..Default::default() };
        let meta = super::super::StanzaMeta::for_test(1);
        Repository::create(&crate::storage::Store::open(&opts.store()).unwrap(), meta, 1, None).await.unwrap().0
    }

    /// Issue 10, case 7: a process that listed the lock, then paused while
    /// another took and released it and a third took it, must not take it
    /// too when it resumes (released generations used to be deleted, so
    /// the paused one created a number that was free again).
    #[tokio::test]
    async fn a_process_that_listed_before_a_release_cannot_hold_the_lock_beside_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).await;
        let (gens, holder) = newest(&repo).await.unwrap();
        let paused = (gens.iter().copied().max().unwrap_or(0), holder);

        let second = StanzaLock::acquire(&repo, "backup").await.unwrap();
        second.release().await.unwrap();
        let third = StanzaLock::acquire(&repo, "backup").await.unwrap();

        let e = StanzaLock::claim(&repo, "backup", paused.0, paused.1).await.err().expect("two holders at once");
        assert!(e.to_string().contains("took the lock"), "{e}");
        let e = StanzaLock::acquire(&repo, "expire").await.err().expect("the third still holds it");
        assert!(e.to_string().contains("backup is running"), "{e}");
        third.release().await.unwrap();
        let (gens, _) = newest(&repo).await.unwrap();
        assert_eq!(gens.iter().max(), Some(&2), "generation numbers only grow: {gens:?}");
        StanzaLock::acquire(&repo, "expire").await.unwrap().release().await.unwrap();
    }

    #[test]
    fn a_zombie_child_is_not_alive() {
        // A child that exits and is not waited for stays a zombie.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process_state(pid).is_none_or(|(s, _)| s != 'Z') {
            assert!(std::time::Instant::now() < deadline, "child {pid} did not become a zombie");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut h = Holder::me("backup");
        h.pid = pid;
        h.started = process_state(pid).map(|(_, s)| s);
        assert!(!h.alive(Utc::now()), "a zombie holds nothing");
        child.wait().unwrap();
    }
}
