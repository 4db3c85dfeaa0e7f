//! Progress of long operations (backup, restore, verify), two ways:
//! counters a front end polls ([`Progress::snapshot`]), and events it
//! subscribes to ([`Progress::subscribe`]): the step the operation is at,
//! its plan, and the totals after each file. The engine only reports; the
//! CLI draws a line on a terminal, the agent keeps its status and metrics.
//!
//! Events go through a bounded broadcast channel: a subscriber that falls
//! behind loses the oldest events (it is told how many, and the next
//! `Advanced` carries the running totals again), and an operation never
//! waits for its subscribers, nor holds memory for them beyond the bound.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

/// How many events a subscriber may fall behind before it loses some.
const EVENTS_KEPT: usize = 1024;

/// A step of a long operation, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Backup: `pg_backup_start` (a checkpoint on the server).
    Starting,
    /// Backup and restore: the files.
    Copying,
    /// Backup: `pg_backup_stop`.
    Stopping,
    /// Backup: waiting for the WAL the backup needs to be archived.
    WaitingForWal,
    /// Backup: writing the manifest; restore: the recovery settings and
    /// `pg_control`.
    Finishing,
    /// Verify: reading the stored data back.
    Reading,
}

/// What a subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The operation is at `step`.
    Step {
        /// The step.
        step: Step,
    },
    /// What there is to do.
    Planned {
        /// Files (or parts of files).
        files: u64,
        /// Bytes.
        bytes: u64,
    },
    /// A file is done; the totals so far.
    Advanced {
        /// Files done.
        files: u64,
        /// Bytes done.
        bytes: u64,
    },
}

/// Counters and events of one operation; pass it in the operation's
/// options.
#[derive(Debug)]
pub struct Progress {
    /// Bytes planned.
    pub total_bytes: AtomicU64,
    /// Bytes done.
    pub done_bytes: AtomicU64,
    /// Files planned.
    pub total_files: AtomicU64,
    /// Files done.
    pub done_files: AtomicU64,
    events: broadcast::Sender<Event>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            total_bytes: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            total_files: AtomicU64::new(0),
            done_files: AtomicU64::new(0),
            events: broadcast::channel(EVENTS_KEPT).0,
        }
    }
}

impl Progress {
    /// The events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Says the operation is at `step`.
    pub fn step(&self, step: Step) {
        self.send(Event::Step { step });
    }

    /// Sets the plan's totals.
    pub fn plan(&self, files: u64, bytes: u64) {
        self.total_files.store(files, Ordering::Relaxed);
        self.total_bytes.store(bytes, Ordering::Relaxed);
        self.send(Event::Planned { files, bytes });
    }

    /// Counts bytes done.
    pub fn add_bytes(&self, n: u64) {
        self.done_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one file done.
    pub fn file_done(&self) {
        let files = self.done_files.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(Event::Advanced { files, bytes: self.done_bytes.load(Ordering::Relaxed) });
    }

    /// (done files, total files, done bytes, total bytes).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.done_files.load(Ordering::Relaxed),
            self.total_files.load(Ordering::Relaxed),
            self.done_bytes.load(Ordering::Relaxed),
            self.total_bytes.load(Ordering::Relaxed),
        )
    }

    fn send(&self, event: Event) {
        // No subscriber is no error: nobody listens.
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscriber_hears_steps_plan_and_totals_in_order_and_a_slow_one_never_holds_the_operation() {
        let p = Progress::default();
        p.file_done(); // before anyone listens: not kept for later subscribers
        let mut rx = p.subscribe();
        p.step(Step::Copying);
        p.plan(2, 300);
        p.add_bytes(100);
        p.file_done();
        p.add_bytes(200);
        p.file_done();
        p.step(Step::Finishing);
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        assert_eq!(
            got,
            vec![
                Event::Step { step: Step::Copying },
                Event::Planned { files: 2, bytes: 300 },
                Event::Advanced { files: 2, bytes: 100 },
                Event::Advanced { files: 3, bytes: 300 },
                Event::Step { step: Step::Finishing },
            ]
        );
        // One that never reads loses the oldest events, not the operation's
        // time or memory; what it reads next still carries the totals.
        let mut slow = p.subscribe();
        for _ in 0..(EVENTS_KEPT * 3) {
            p.file_done();
        }
        assert!(matches!(slow.try_recv(), Err(broadcast::error::TryRecvError::Lagged(n)) if n == (EVENTS_KEPT * 2) as u64));
        let Ok(Event::Advanced { files, .. }) = slow.try_recv() else { panic!("no totals after the lag") };
        assert_eq!(files, 3 + EVENTS_KEPT as u64 * 2 + 1);
        assert_eq!(
            serde_json::to_value(Event::Step { step: Step::WaitingForWal }).unwrap(),
            serde_json::json!({"event": "step", "step": "waiting-for-wal"})
        );
    }
}
