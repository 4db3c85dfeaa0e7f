//! The engine's error type.
//!
//! Policy:
//! - Every message is one line that says what is wrong and, where the user
//!   can act, what to do. Messages name the object, file or setting involved.
//! - Variants are grouped by what the caller can do about them, not by the
//!   module that raised them: [`Error::NotFound`] is the only variant that
//!   `archive-get` may report as "not in the archive" (exit 1); everything
//!   else must stop recovery.
//! - [`Error::retryable`] tells whether trying again may help (a store or a
//!   server that did not answer), which the archiver and retries rely on.
//! - The underlying error is folded into the one line, once (it is not
//!   exposed as a `source`, which would print it twice); no backtraces
//!   reach the user.

use std::fmt;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An engine error. See the module documentation for the policy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration, flags or arguments.
    #[error("{0}")]
    Input(String),
    /// The requested object (WAL file, backup, stanza) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An operation was refused to protect data (non-empty directory,
    /// running cluster, another cluster's repository or WAL, ...).
    #[error("{0}")]
    Refused(String),
    /// A stored object failed its checksum, size or format check.
    #[error("{0}")]
    Corrupt(String),
    /// The object store failed.
    #[error("{what}: {}", one_line(cause))]
    Storage {
        /// What was being done.
        what: String,
        /// The store's error (not exposed as a `source`: the message
        /// already holds it, once).
        cause: object_store::Error,
    },
    /// PostgreSQL failed or could not be reached.
    #[error("{what}: {}", one_line(cause))]
    Postgres {
        /// What was being done.
        what: String,
        /// The driver's error.
        cause: tokio_postgres::Error,
    },
    /// A bug: a task of the engine panicked. Not the input's fault, and
    /// trying again is not expected to help.
    #[error("internal error: {0} (a bug in pgkeep; please report it)")]
    Internal(String),
    /// A local file operation failed.
    #[error("{what}: {}", one_line(cause))]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The OS error.
        cause: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Error::Storage { .. } | Error::Postgres { .. })
    }

    /// A task that did not finish: it panicked (an [`Error::Internal`]) or
    /// was cancelled; `what` names the task.
    pub fn task(what: impl Into<String>) -> impl FnOnce(tokio::task::JoinError) -> Error {
        let what = what.into();
        move |e| match e.try_into_panic() {
            Ok(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                Error::Internal(format!("{what} panicked: {}", text.replace('\n', " ")))
            }
            Err(_) => Error::Internal(format!("{what} was cancelled")),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |cause| Error::Io { what, cause }
    }

    /// Wraps a store error with what was being done.
    pub fn storage(what: impl Into<String>) -> impl FnOnce(object_store::Error) -> Error {
        let what = what.into();
        move |cause| Error::Storage { what, cause }
    }

    /// Wraps a PostgreSQL error with what was being done.
    pub fn postgres(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let what = what.into();
        move |cause| Error::Postgres { what, cause }
    }
}

/// Flattens an error and its sources into one line.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Formats any error chain as the single line printed to the user.
pub struct OneLine<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&one_line(self.0))
    }
}
