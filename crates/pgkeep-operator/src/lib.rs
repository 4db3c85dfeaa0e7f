//! # pgkeep-operator
//!
//! The Kubernetes operator of pgkeep: custom resources of API group
//! `pgkeep.dev` ([`crd`]) reconciled by one controller per kind, each a
//! `reconcile` + `error_policy` pair over a shared [`context::Context`]
//! (client, event recorder, metrics, settings), as kube-rs's
//! controller-rs does. The work on the database happens in each pod's
//! agent (`pgkeep agent`, crate `pgkeep-agent`), which the reconcilers
//! call over its HTTP API.
//!
//! - [`stanza`]: the pods' config, the agents' token Secret and the
//!   Stanza's status;
//! - [`backup`]: one Backup, pending -> running -> completed | failed;
//! - [`scheduled`]: Backups on a cron schedule;
//! - pure logic, unit-tested without a server: [`target`] (which pod),
//!   [`schedule`] (cron, missed ticks);
//! - [`pods`]: a stanza's pods and agents;
//! - [`render`]: the pgkeep config file of a Stanza (a ConfigMap);
//! - [`webhook`] and [`inject`] (pure): the mutating admission webhook
//!   that adds pgkeep to PostgreSQL pods labelled `pgkeep.dev/stanza`;
//! - [`run`]: the controllers together, and the metrics endpoint.

pub mod backup;
pub mod cnpg;
pub mod context;
pub mod crd;
pub mod error;
pub mod inject;
pub mod pods;
pub mod render;
pub mod run;
pub mod schedule;
pub mod scheduled;
pub mod stanza;
pub mod target;
pub mod webhook;
