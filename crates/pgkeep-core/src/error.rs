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
//! - What the user can do is, where it is an operation to run or an option
//!   to ask again with, a [`Hint`]: data beside the message, which each
//!   front end words in its own terms (the CLI as its commands and flags,
//!   the operator as its resources' fields). No message of the engine
//!   names a command-line flag or command (a test reads the source for
//!   them); messages do name configuration keys (`pg-data`,
//!   `backup-standby`...), which every front end shares.

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
    /// An error of any other kind, with what the user can do about it.
    /// [`Error::kind`] is the error itself, to match on.
    #[error("{error}")]
    Hinted {
        /// The error.
        error: Box<Error>,
        /// What to do about it.
        hint: Hint,
    },
}

/// What the user can do about an error, as data (see the module
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Hint {
    /// Run this operation on the stanza (first, or to see more).
    Run {
        /// The operation.
        operation: Operation,
    },
    /// Ask again with this option of the operation that failed.
    Retry {
        /// The option.
        option: Opt,
    },
    /// Any of these.
    AnyOf {
        /// The choices.
        hints: Vec<Hint>,
    },
}

/// An operation a [`Hint`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Create the stanza in the repository.
    StanzaCreate,
    /// Record the cluster's new system after `pg_upgrade`.
    StanzaUpgrade,
    /// Take a backup.
    Backup,
    /// List the backups and the archive.
    Info,
    /// Check the stored data.
    Verify,
}

/// An option of the failed operation a [`Hint`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Opt {
    /// Go ahead although the operation refused to (replace, delete).
    Force,
    /// A restore: replace the contents of a non-empty destination instead
    /// of rewriting what differs (which needs the same cluster there).
    ForceInsteadOfDelta,
    /// A restore: replace a tablespace's own location too.
    ForceTablespaces,
    /// A restore: put a tablespace elsewhere.
    TablespaceMap,
    /// Removing a backup: remove the backups built on it too.
    WithDependents,
    /// Name the backup.
    Set,
    /// A restore: the timeline recovery follows.
    TargetTimeline,
    /// The data directory.
    PgData,
    /// The configuration file.
    Config,
    /// The stanza.
    Stanza,
    /// The repository's location.
    Location,
    /// The repository.
    Repo,
}

impl Hint {
    /// Run `operation`.
    pub fn run(operation: Operation) -> Hint {
        Hint::Run { operation }
    }

    /// Ask again with `option`.
    pub fn retry(option: Opt) -> Hint {
        Hint::Retry { option }
    }

    /// Any of `hints`.
    pub fn any_of(hints: impl IntoIterator<Item = Hint>) -> Hint {
        Hint::AnyOf { hints: hints.into_iter().collect() }
    }
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self.kind(), Error::Storage { .. } | Error::Postgres { .. })
    }

    /// This error with what the user can do about it.
    pub fn with_hint(self, hint: Hint) -> Error {
        Error::Hinted { error: Box::new(self.without_hint()), hint }
    }

    /// The error itself, without its hint: what to match on.
    pub fn kind(&self) -> &Error {
        match self {
            Error::Hinted { error, .. } => error.kind(),
            other => other,
        }
    }

    /// What the user can do about it, when the engine knows.
    pub fn hint(&self) -> Option<&Hint> {
        match self {
            Error::Hinted { hint, .. } => Some(hint),
            _ => None,
        }
    }

    fn without_hint(self) -> Error {
        match self {
            Error::Hinted { error, .. } => error.without_hint(),
            other => other,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_travels_beside_the_message_and_the_kind_stays_matchable() {
        let e = Error::NotFound("backup x does not exist in repo 1".into()).with_hint(Hint::run(Operation::Info));
        assert_eq!(e.to_string(), "backup x does not exist in repo 1", "the message says what is wrong, nothing more");
        assert!(matches!(e.kind(), Error::NotFound(_)) && !e.retryable());
        assert_eq!(e.hint(), Some(&Hint::run(Operation::Info)));
        // A new hint replaces the old one; hints do not nest.
        let e = e.with_hint(Hint::retry(Opt::Set));
        assert!(matches!(&e, Error::Hinted { error, .. } if matches!(**error, Error::NotFound(_))));
        assert_eq!(serde_json::to_value(e.hint()).unwrap(), serde_json::json!({"kind": "retry", "option": "set"}));
    }

    /// No message of the engine names a command-line flag or a `pgkeep`
    /// command: each front end words hints in its own terms. Read from the
    /// source: every string literal outside comments and test modules.
    /// PostgreSQL settings (`archive_command = 'pgkeep ... archive-push
    /// %p'`) and arguments of programs the engine runs (`.arg(`, `.args(`)
    /// are not messages.
    #[test]
    fn no_engine_message_names_a_command_line_flag_or_command() {
        let mut found = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate().take_while(|(_, l)| l.trim() != "#[cfg(test)]") {
                    if line.trim_start().starts_with("//") || line.contains(".args(") || line.contains(".arg(") {
                        continue;
                    }
                    for literal in line.split('"').skip(1).step_by(2) {
                        let setting = literal.contains("archive_command") || literal.contains("archive-push %p");
                        let flag = literal
                            .split([' ', '`', '('])
                            .any(|w| w.len() > 2 && w.starts_with("--") && w.as_bytes()[2].is_ascii_lowercase());
                        if !setting && (flag || literal.contains("`pgkeep")) {
                            found.push(format!("{}:{}: {literal}", path.display(), n + 1));
                        }
                    }
                }
            }
        }
        assert!(found.is_empty(), "engine messages naming CLI flags or commands (give a Hint instead):\n{}", found.join("\n"));
    }
}
