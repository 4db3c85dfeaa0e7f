//! Progress of long operations, as counters the front end polls: the engine
//! only counts, the CLI decides how (and whether) to show it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters updated by backup and restore workers.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes planned.
    pub total_bytes: AtomicU64,
    /// Bytes done.
    pub done_bytes: AtomicU64,
    /// Files planned.
    pub total_files: AtomicU64,
    /// Files done.
    pub done_files: AtomicU64,
}

impl Progress {
    /// Sets the plan's totals.
    pub fn plan(&self, files: u64, bytes: u64) {
        self.total_files.store(files, Ordering::Relaxed);
        self.total_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Counts bytes done.
    pub fn add_bytes(&self, n: u64) {
        self.done_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one file done.
    pub fn file_done(&self) {
        self.done_files.fetch_add(1, Ordering::Relaxed);
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
}
