//! # pgkeep-agent
//!
//! The process that runs beside PostgreSQL in each pod (`pgkeep agent`):
//! it embeds the engine and serves, over HTTP, what the Kubernetes
//! operator needs of that pod: the server's role and WAL position (to
//! choose where a backup runs), backups started, followed and cancelled by
//! id, the repository's `info` (for the Stanza's status), a health check
//! and Prometheus metrics.
//!
//! - [`api`]: the routes and the types on the wire;
//! - [`server`]: the HTTP server;
//! - [`jobs`]: backup jobs, each a child `pgkeep backup` process;
//! - [`metrics`]: the Prometheus text;
//! - [`client`]: the operator's side.
//!
//! The API is one front end of the agent; the other, [`cnpgi`], serves
//! CloudNativePG's plugin interface (gRPC on a Unix socket) from the same
//! process, over the same engine and the same one backup job at a time.
//!
//! Why a bearer token and not mutual TLS: the operator and the agents
//! already share a Secret (the operator creates `<stanza>-agent` with a
//! random `token`, the pods mount it), which needs no certificate
//! authority, no rotation machinery and no cert-manager; the token
//! authenticates the operator, and the API carries no secrets (no
//! credentials, no data: only commands and status). Its weakness, that
//! the token crosses the pod network in clear, is the same as that of
//! PostgreSQL's own password authentication there; a NetworkPolicy that
//! lets only the operator reach the agent's port closes it, and
//! `deploy/` ships one.

pub mod api;
pub mod client;
pub mod cnpgi;
pub mod jobs;
pub mod metrics;
pub mod server;
