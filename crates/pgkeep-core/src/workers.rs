//! A fixed set of blocking threads working through a list of units, each
//! keeping its own scratch state (buffers, compression contexts) from one
//! unit to the next, and sending what each unit gave to the async task
//! that reads them. For many small files this is what keeps the cost per
//! file down: no allocation, and no hand-off to a new task, per file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// `n` threads running `work(&mut scratch, unit)` over `units` in order.
/// On the first error the others stop after their current unit, and the
/// error is returned once they have: nothing is still writing when the
/// caller cleans up.
pub struct Workers<T> {
    what: &'static str,
    handles: Vec<tokio::task::JoinHandle<()>>,
    rx: mpsc::UnboundedReceiver<Result<T>>,
    stop: Arc<AtomicBool>,
}

impl<T: Send + 'static> Workers<T> {
    /// Starts `n` threads (at least one, at most one per unit) named by
    /// `what` in errors. Each makes its scratch with `S::default()`.
    pub fn start<U, S, F>(what: &'static str, n: usize, units: Vec<U>, work: F) -> Self
    where
        U: Send + 'static,
        S: Default,
        F: Fn(&mut S, &U) -> Result<T> + Send + Sync + 'static,
    {
        let n = n.min(units.len()).max(1);
        let units = std::sync::Mutex::new(units.into_iter());
        Self::fed(what, n, move || units.lock().ok()?.next(), work)
    }

    /// Starts `n` threads taking their units from `next` until it gives
    /// `None` (a channel's receiver, for units made while others are
    /// worked on).
    pub fn fed<U, S, N, F>(what: &'static str, n: usize, next: N, work: F) -> Self
    where
        U: Send + 'static,
        S: Default,
        N: Fn() -> Option<U> + Send + Sync + 'static,
        F: Fn(&mut S, &U) -> Result<T> + Send + Sync + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let (next, work) = (Arc::new(next), Arc::new(work));
        let handles = (0..n.max(1))
            .map(|_| {
                let (next, work, stop, tx) = (next.clone(), work.clone(), stop.clone(), tx.clone());
                tokio::task::spawn_blocking(move || {
                    let mut scratch = S::default();
                    while !stop.load(Ordering::Relaxed) {
                        let Some(unit) = next() else { break };
                        let done = work(&mut scratch, &unit);
                        let failed = done.is_err();
                        if tx.send(done).is_err() || failed {
                            break;
                        }
                    }
                })
            })
            .collect();
        Workers { what, handles, rx, stop }
    }

    /// The next result, in the order units end; `None` once every thread
    /// has ended. An error is returned once the other threads have
    /// stopped.
    pub async fn next(&mut self) -> Option<Result<T>> {
        match self.rx.recv().await? {
            Ok(v) => Some(Ok(v)),
            Err(e) => {
                self.stop.store(true, Ordering::Relaxed);
                self.rx.close();
                let _ = self.finish().await;
                Some(Err(e))
            }
        }
    }

    /// Waits for every thread; a thread that panicked is an error.
    pub async fn finish(&mut self) -> Result<()> {
        let mut first = Ok(());
        for h in std::mem::take(&mut self.handles) {
            if let Err(e) = h.await.map_err(Error::task(self.what)) {
                first = first.and(Err(e));
            }
        }
        first
    }

    /// Every result, in the order units end; the first error instead, once
    /// the other threads have stopped.
    pub async fn collect(mut self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        while let Some(v) = self.next().await {
            out.push(v?);
        }
        self.finish().await?;
        Ok(out)
    }

    /// [`Workers::next`] from a blocking thread of the runtime, but an
    /// error is returned at once, the other threads asked to stop: the
    /// caller stops what feeds them, then waits for them with
    /// [`Workers::finish_blocking`].
    pub fn next_blocking(&mut self) -> Option<Result<T>> {
        let done = self.rx.blocking_recv()?;
        if done.is_err() {
            self.stop.store(true, Ordering::Relaxed);
            self.rx.close();
        }
        Some(done)
    }

    /// [`Workers::finish`] from a blocking thread of the runtime.
    pub fn finish_blocking(&mut self) -> Result<()> {
        tokio::runtime::Handle::current().block_on(self.finish())
    }

    /// Asks the threads to stop after their current unit.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_unit_once_with_scratch_kept_and_the_first_error_after_the_others_stop() {
        // Each thread counts the units it did in its scratch.
        let w = Workers::start("a test worker", 3, (0..1000u32).collect(), |seen: &mut u32, u| {
            *seen += 1;
            Ok((*u, *seen))
        });
        let mut got = w.collect().await.unwrap();
        assert!(got.iter().any(|(_, seen)| *seen > 1), "scratch is kept between units");
        got.sort();
        assert_eq!(got.iter().map(|(u, _)| *u).collect::<Vec<_>>(), (0..1000).collect::<Vec<_>>());

        let running = Arc::new(AtomicUsize::new(0));
        let r = running.clone();
        let w = Workers::start("a test worker", 2, (0..100u32).collect(), move |_: &mut (), u| {
            r.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            r.fetch_sub(1, Ordering::SeqCst);
            match *u {
                10 => Err(Error::Input("unit 10".into())),
                u => Ok(u),
            }
        });
        let e = w.collect().await.unwrap_err();
        assert!(e.to_string().contains("unit 10"), "{e}");
        assert_eq!(running.load(Ordering::SeqCst), 0, "a thread was still working when the error was returned");

        let w = Workers::start("a test worker", 2, vec![1u32], |_: &mut (), _| -> Result<u32> { panic!("boom") });
        let e = w.collect().await.unwrap_err();
        assert!(e.to_string().contains("a test worker"), "{e}");
    }
}
