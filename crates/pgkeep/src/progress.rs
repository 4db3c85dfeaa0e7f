//! Progress on a terminal: a line on stderr, redrawn twice a second, only
//! when stderr is a terminal (scripts get the JSON result instead): the
//! step the engine last announced, and its counters.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use pgkeep_core::progress::{Event, Progress, Step};
use tokio::sync::broadcast::error::TryRecvError;

/// Shows `progress` under `verb` until the returned guard is dropped.
pub struct Ticker(Option<tokio::task::JoinHandle<()>>);

impl Ticker {
    pub fn start(verb: &'static str, progress: Arc<Progress>) -> Ticker {
        if !std::io::stderr().is_terminal() {
            return Ticker(None);
        }
        let started = std::time::Instant::now();
        let mut events = progress.subscribe();
        Ticker(Some(tokio::spawn(async move {
            let mut step = None;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                // Only the step matters here; the counters are polled.
                loop {
                    match events.try_recv() {
                        Ok(Event::Step { step: s }) => step = Some(s),
                        Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
                let doing = step.map(|s| format!(" ({})", words(s))).unwrap_or_default();
                let (f, tf, b, tb) = progress.snapshot();
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let pct = (b * 100).checked_div(tb).unwrap_or(0);
                eprint!(
                    "\r\x1b[K{verb}{doing}: {pct:>3}%  {f}/{tf} files  {}/{}  {}/s",
                    bytes(b),
                    bytes(tb),
                    bytes((b as f64 / secs) as u64)
                );
                let _ = std::io::stderr().flush();
            }
        })))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            eprint!("\r\x1b[K");
        }
    }
}

/// A step as the line shows it.
fn words(step: Step) -> &'static str {
    match step {
        Step::Starting => "starting: checkpoint on the server",
        Step::Copying => "copying",
        Step::Stopping => "stopping",
        Step::WaitingForWal => "waiting for the WAL to be archived",
        Step::Finishing => "finishing",
        Step::Reading => "reading",
    }
}

pub use pgkeep_core::types::human_bytes as bytes;
