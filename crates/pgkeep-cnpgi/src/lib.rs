//! CloudNativePG's plugin interface (CNPG-I) for pgkeep.
//!
//! - [`proto`]: the gRPC services and messages, generated from the protos
//!   vendored in `proto/` (CNPG-I v0.6.0; see `proto/README.md`).
//! - [`cluster`]: the parts of CloudNativePG's `Cluster` and `Backup`
//!   objects (they travel as JSON bytes) that the plugin reads, and which
//!   stanza a request is about.
//!
//! The instance side (the agent, on a Unix socket in each pod) is in
//! `pgkeep-agent`; this crate holds only what both sides share.

pub mod cluster;
pub mod identity;

/// The plugin's name, as CloudNativePG's `spec.plugins[].name` and the
/// socket's file name (`/plugins/pgkeep.dev`) spell it.
pub const PLUGIN_NAME: &str = "pgkeep.dev";

/// A gRPC channel to a plugin serving on the Unix socket `path`, as
/// CloudNativePG's instance manager connects to `/plugins/<name>`.
pub async fn connect_unix(path: impl Into<std::path::PathBuf>) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.into();
    // The URI is not used: every connection goes to the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
}

/// The generated CNPG-I code, one module per proto package.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// `cnpgi.identity.v1` (identity.proto and postgres.proto).
    pub mod identity {
        tonic::include_proto!("cnpgi.identity.v1");
    }
    /// `cnpgi.wal.v1` (wal.proto and restore_job.proto).
    pub mod wal {
        tonic::include_proto!("cnpgi.wal.v1");
    }
    /// `cnpgi.backup.v1`.
    pub mod backup {
        tonic::include_proto!("cnpgi.backup.v1");
    }
    /// `cnpgi.metrics.v1`.
    pub mod metrics {
        tonic::include_proto!("cnpgi.metrics.v1");
    }
    /// `cnpgi.operator.v1`.
    pub mod operator {
        tonic::include_proto!("cnpgi.operator.v1");
    }
    /// `cnpgi.operator_lifecycle.v1`.
    pub mod lifecycle {
        tonic::include_proto!("cnpgi.operator_lifecycle.v1");
    }
    /// `cnpgi.reconciler.v1`.
    pub mod reconciler {
        tonic::include_proto!("cnpgi.reconciler.v1");
    }
}
