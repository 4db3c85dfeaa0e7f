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
//! refuses), deletes older generations, and refreshes its own every 30 s
//! while it works; releasing deletes it.
//!
//! A holder is alive while it is a running pgkeep process with that pid on
//! this host, or, on another host, while it refreshed the lock in the last
//! two minutes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Repository;
use crate::error::{Error, Result};

const DIR: &str = "lock";
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
        }
    }

    /// Whether the holder may still be running: on this host, a live
    /// pgkeep process with that pid (not this one); on another, one that
    /// refreshed the lock in the last two minutes.
    pub fn alive(&self, now: DateTime<Utc>) -> bool {
        if self.host == host_name() {
            self.pid != std::process::id()
                && std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).is_ok_and(|comm| comm.trim().starts_with("pgkeep"))
        } else {
            (now - self.updated).num_seconds() < REMOTE_STALE_SECS
        }
    }
}

/// This machine's host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// A held lock; call [`StanzaLock::release`] when done. Dropped without
/// release (a panic), it is left for the next process to take over once
/// this one has exited.
pub struct StanzaLock {
    repo: Repository,
    key: String,
    refresher: tokio::task::JoinHandle<()>,
}

impl StanzaLock {
    /// Takes the lock for `command`, or refuses naming who holds it.
    pub async fn acquire(repo: &Repository, command: &str) -> Result<StanzaLock> {
        let (generations, newest) = newest(repo).await?;
        let top = generations.iter().copied().max().unwrap_or(0);
        if let Some(h) = newest.filter(|h| h.alive(Utc::now())) {
            return Err(busy(repo, &h));
        }
        let me = Holder::me(command);
        let next = key(top + 1);
        if !repo.put_metadata(&next, &me, true).await? {
            return Err(Error::Refused(format!(
                "another process took the lock of stanza '{}' in repo {} just now; run {command} again when it is done",
                repo.meta.stanza, repo.number
            )));
        }
        let what = format!("lock of stanza '{}' in repo {}", repo.meta.stanza, repo.number);
        match repo.get_metadata::<Holder>(&next, &what).await? {
            Some(h) if h.nonce == me.nonce => {}
            Some(h) => return Err(busy(repo, &h)),
            None => return Err(Error::Refused(format!("{what} vanished as it was taken; run {command} again"))),
        }
        let older: Vec<String> = generations.iter().filter(|g| **g <= top).map(|g| key(*g)).collect();
        let _ = repo.store().delete_all(older).await;
        let refresher = {
            let (repo, next, mut me) = (repo.clone(), next.clone(), me);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    me.updated = Utc::now();
                    let _ = repo.put_metadata(&next, &me, false).await;
                }
            })
        };
        Ok(StanzaLock { repo: repo.clone(), key: next, refresher })
    }

    /// Releases the lock.
    pub async fn release(self) -> Result<()> {
        self.refresher.abort();
        self.repo.store().delete_all(vec![self.key.clone()]).await
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
    format!("{DIR}/{generation}.json")
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
        assert!(!h.alive(now), "this process is not a holder");
        h.host = "another-machine".into();
        assert!(h.alive(now));
        assert!(!h.alive(now + chrono::Duration::seconds(REMOTE_STALE_SECS + 1)));
    }
}
