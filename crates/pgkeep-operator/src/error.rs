//! The operator's errors, grouped by what the controller can do: try again
//! soon (the API server or an agent did not answer), or wait for the user
//! to change something (a malformed resource, a missing Secret).

use std::time::Duration;

use kube::runtime::controller::Action;

/// An error of a reconciler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed or refused.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An agent failed or did not answer.
    #[error("{0}")]
    Agent(#[from] pgkeep_agent::client::ClientError),
    /// A resource is wrong: the message says which field and what to do.
    #[error("{0}")]
    Invalid(String),
    /// The finalizer machinery failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// The reconcilers' result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again soon can help.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => s.code == 409 || s.code == 429 || s.code >= 500,
            Error::Kube(_) => true,
            Error::Agent(e) => e.retryable(),
            Error::Invalid(_) => false,
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e.retryable(),
                _ => true,
            },
        }
    }

    /// The label of the `pgkeep_operator_reconcile_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Agent(_) => "agent",
            Error::Invalid(_) => "invalid",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// What a reconciler does after an error: soon when retrying can help,
/// else after a long wait (a change to the resource triggers a reconcile
/// anyway).
pub fn requeue_after(e: &Error) -> Action {
    if e.retryable() {
        Action::requeue(Duration::from_secs(10))
    } else {
        Action::requeue(Duration::from_secs(300))
    }
}
