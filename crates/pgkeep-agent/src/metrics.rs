//! Prometheus metrics of one agent, in the text exposition format, made
//! on each scrape: from the repository's `info` (cached 30 s: every pod's
//! agent reports the same repository), from the local server's
//! `pg_stat_archiver`, and from the backups this agent ran.
//!
//! | metric | what |
//! |---|---|
//! | `pgkeep_agent_up` | 1 |
//! | `pgkeep_pg_up` | 1 when the local server answers |
//! | `pgkeep_pg_primary` | 1 on the primary, 0 on a standby |
//! | `pgkeep_backups` | backups in the repository |
//! | `pgkeep_first_recoverability_point_seconds` | end of the oldest backup (Unix time) |
//! | `pgkeep_last_recoverability_point_seconds` | the later of the newest backup's end and the last archived segment |
//! | `pgkeep_last_backup_seconds{type}` | end of the newest backup of each type |
//! | `pgkeep_last_backup_size_bytes`, `pgkeep_last_backup_repo_size_bytes` | the newest backup's sizes |
//! | `pgkeep_archive_last_archived_seconds` | when the last segment was archived (primary) |
//! | `pgkeep_archive_seconds_since_last_archived` | now minus that |
//! | `pgkeep_archive_failed_total` | failed archive attempts since the server's statistics reset |
//! | `pgkeep_agent_backup_last_success_seconds`, `pgkeep_agent_backup_last_failure_seconds` | end of this agent's last successful / failed backup |
//! | `pgkeep_agent_backup_last_duration_seconds` | how long this agent's last successful backup took |
//!
//! Every series has the label `stanza`.

use std::fmt::Write;

use chrono::Utc;

use crate::api::{AgentStatus, JobState, JobStatus, Role};
use crate::server::Agent;

/// Gauge or counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Goes up and down.
    Gauge,
    /// Only grows (but for resets).
    Counter,
}

/// A metric: name, help, kind, and the labels beside `stanza`.
pub struct Metric {
    /// The name.
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// Gauge or counter.
    pub kind: Kind,
    /// Label names after `stanza`.
    pub labels: &'static [&'static str],
}

const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric { name, help, kind: Kind::Gauge, labels: &[] }
}

/// Every metric an agent writes, in the order written.
pub const METRICS: &[Metric] = &[
    gauge("pgkeep_agent_up", "The agent serves."),
    gauge("pgkeep_pg_up", "The local PostgreSQL answers."),
    gauge("pgkeep_pg_primary", "1 on the primary, 0 on a standby."),
    gauge("pgkeep_archive_last_archived_seconds", "When the last WAL segment was archived."),
    gauge("pgkeep_archive_seconds_since_last_archived", "Seconds since the last WAL segment was archived."),
    Metric {
        name: "pgkeep_archive_failed_total",
        help: "Failed archive attempts since the statistics reset.",
        kind: Kind::Counter,
        labels: &[],
    },
    gauge("pgkeep_backups", "Backups in the repository."),
    gauge("pgkeep_first_recoverability_point_seconds", "The earliest point a restore can reach."),
    gauge("pgkeep_last_recoverability_point_seconds", "The latest point a restore can reach."),
    gauge("pgkeep_last_backup_size_bytes", "Database bytes of the newest backup."),
    gauge("pgkeep_last_backup_repo_size_bytes", "Stored bytes of the newest backup."),
    Metric { name: "pgkeep_last_backup_seconds", help: "End of the newest backup of each type.", kind: Kind::Gauge, labels: &["type"] },
    gauge("pgkeep_agent_backup_last_success_seconds", "End of this agent's last successful backup."),
    gauge("pgkeep_agent_backup_last_duration_seconds", "Duration of this agent's last successful backup."),
    gauge("pgkeep_agent_backup_last_failure_seconds", "End of this agent's last failed backup."),
];

/// One value of a metric of [`METRICS`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name.
    pub name: &'static str,
    /// The values of its labels after `stanza`, in [`Metric::labels`]'
    /// order.
    pub labels: Vec<String>,
    /// The value.
    pub value: f64,
}

/// What the metrics are made of.
pub struct Inputs<'a> {
    /// The local server, when it answered.
    pub status: Option<&'a AgentStatus>,
    /// The repository's `info` (the engine's JSON), when it could be read.
    pub info: Option<&'a serde_json::Value>,
    /// The backups this agent ran and that ended, oldest first.
    pub finished: &'a [JobStatus],
}

/// Unix seconds of an RFC 3339 time.
fn unix(t: &str) -> Option<i64> {
    pgkeep_core::types::parse_rfc3339(t).map(|d| d.timestamp())
}

/// The samples of `inputs` (a pure function: the Prometheus text and
/// CNPG-I's Metrics service are two spellings of it).
pub fn collect(inputs: &Inputs<'_>) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut one = |name: &'static str, v: Option<f64>| {
        if let Some(value) = v {
            out.push(Sample { name, labels: Vec::new(), value });
        }
    };
    one("pgkeep_agent_up", Some(1.0));
    one("pgkeep_pg_up", Some(if inputs.status.is_some() { 1.0 } else { 0.0 }));
    let mut last_archived = None;
    if let Some(s) = inputs.status {
        one("pgkeep_pg_primary", Some(if s.role == Role::Primary { 1.0 } else { 0.0 }));
        if s.role == Role::Primary {
            last_archived = s.archive.last_archived_time.as_deref().and_then(unix);
            one("pgkeep_archive_last_archived_seconds", last_archived.map(|t| t as f64));
            one("pgkeep_archive_seconds_since_last_archived", last_archived.map(|t| (Utc::now().timestamp() - t) as f64));
            one("pgkeep_archive_failed_total", Some(s.archive.failed_count as f64));
        }
    }
    let mut per_type = Vec::new();
    if let Some(info) = inputs.info {
        let backups = info.get("backups").and_then(|b| b.as_array()).cloned().unwrap_or_default();
        one("pgkeep_backups", Some(backups.len() as f64));
        let stop = |b: &serde_json::Value| b.get("stop-time").and_then(|t| t.as_str()).and_then(unix);
        one("pgkeep_first_recoverability_point_seconds", backups.first().and_then(stop).map(|t| t as f64));
        if let Some(newest) = backups.last() {
            let last = stop(newest).max(last_archived);
            one("pgkeep_last_recoverability_point_seconds", last.map(|t| t as f64));
            let n = |k: &str| newest.get(k).and_then(|v| v.as_u64()).map(|v| v as f64);
            one("pgkeep_last_backup_size_bytes", n("size"));
            one("pgkeep_last_backup_repo_size_bytes", n("repo-size"));
        }
        for kind in ["full", "diff", "incr"] {
            let t = backups.iter().rev().find(|b| b.get("type").and_then(|t| t.as_str()) == Some(kind)).and_then(stop);
            if let Some(t) = t {
                per_type.push(Sample { name: "pgkeep_last_backup_seconds", labels: vec![kind.to_owned()], value: t as f64 });
            }
        }
    }
    let last_of = |state: JobState| inputs.finished.iter().rev().find(|j| j.state == state);
    let success = last_of(JobState::Completed);
    let success_end = success.and_then(|j| j.stopped_at.as_deref().and_then(unix));
    one("pgkeep_agent_backup_last_success_seconds", success_end.map(|t| t as f64));
    let start = success.and_then(|j| unix(&j.started_at));
    one("pgkeep_agent_backup_last_duration_seconds", success_end.zip(start).map(|(e, s)| (e - s) as f64));
    let failure = last_of(JobState::Failed).and_then(|j| j.stopped_at.as_deref().and_then(unix));
    one("pgkeep_agent_backup_last_failure_seconds", failure.map(|t| t as f64));
    out.extend(per_type);
    out.sort_by_key(|s| METRICS.iter().position(|m| m.name == s.name));
    out
}

/// `samples` in the Prometheus text format, every series labelled with
/// `stanza`.
pub fn text(stanza: &str, samples: &[Sample]) -> String {
    let stanza = escape(stanza);
    let mut text = String::new();
    for m in METRICS {
        let mine: Vec<_> = samples.iter().filter(|s| s.name == m.name).collect();
        if mine.is_empty() {
            continue;
        }
        let kind = if m.kind == Kind::Counter { "counter" } else { "gauge" };
        let _ = writeln!(text, "# HELP {} {}\n# TYPE {} {kind}", m.name, m.help, m.name);
        for s in mine {
            let extra: String = m.labels.iter().zip(&s.labels).map(|(k, v)| format!(",{k}=\"{}\"", escape(v))).collect();
            let _ = writeln!(text, "{}{{stanza=\"{stanza}\"{extra}}} {}", m.name, s.value);
        }
    }
    text
}

fn escape(v: &str) -> String {
    v.replace(['"', '\\', '\n'], "_")
}

/// The metrics text of the agent's stanza.
pub async fn render(agent: &Agent) -> String {
    let status = agent.status().await.ok();
    let info = agent.info(true).await.ok();
    let finished = agent.jobs().finished();
    text(agent.stanza_name(), &collect(&Inputs { status: status.as_ref(), info: info.as_ref(), finished: &finished }))
}
