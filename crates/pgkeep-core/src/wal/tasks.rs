//! The tasks of the asynchronous workers, each working on one named WAL
//! file: a task that panics returns nothing, yet its file must not stay
//! "in flight" forever, so the set gives the name back with every result.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};

/// A set of tasks, each for one named file.
pub(super) struct NamedTasks<T> {
    set: JoinSet<T>,
    names: HashMap<Id, String>,
}

impl<T: Send + 'static> NamedTasks<T> {
    pub(super) fn new() -> Self {
        NamedTasks { set: JoinSet::new(), names: HashMap::new() }
    }

    /// Starts `task` for the file `name`.
    pub(super) fn spawn(&mut self, name: String, task: impl Future<Output = T> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// A task that has ended, if any: its file's name and what it returned
    /// (an error when it panicked).
    pub(super) fn try_join_next(&mut self) -> Option<(String, Result<T, JoinError>)> {
        let done = self.set.try_join_next_with_id()?;
        Some(self.named(done))
    }

    /// The next task to end; `None` when there is none.
    pub(super) async fn join_next(&mut self) -> Option<(String, Result<T, JoinError>)> {
        let done = self.set.join_next_with_id().await?;
        Some(self.named(done))
    }

    fn named(&mut self, done: Result<(Id, T), JoinError>) -> (String, Result<T, JoinError>) {
        let (id, result) = match done {
            Ok((id, value)) => (id, Ok(value)),
            Err(e) => (e.id(), Err(e)),
        };
        (self.names.remove(&id).unwrap_or_default(), result)
    }
}
