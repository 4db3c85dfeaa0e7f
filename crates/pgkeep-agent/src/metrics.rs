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

use crate::api::{JobState, Role};
use crate::server::Agent;

/// Unix seconds of an RFC 3339 time.
fn unix(t: &str) -> Option<i64> {
    pgkeep_core::types::parse_rfc3339(t).map(|d| d.timestamp())
}

struct Out {
    text: String,
    stanza: String,
}

impl Out {
    fn gauge(&mut self, name: &str, help: &str, samples: &[(&str, f64)]) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in samples {
            let extra = if labels.is_empty() { String::new() } else { format!(",{labels}") };
            let _ = writeln!(self.text, "{name}{{stanza=\"{}\"{extra}}} {v}", self.stanza);
        }
    }

    fn one(&mut self, name: &str, help: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.gauge(name, help, &[("", v)]);
        }
    }

    /// A counter: it only grows, but for resets (here: of PostgreSQL's
    /// statistics), which rate() and increase() handle.
    fn counter(&mut self, name: &str, help: &str, v: f64) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{stanza=\"{}\"}} {v}", self.stanza);
    }
}

/// The metrics text.
pub async fn render(agent: &Agent) -> String {
    let mut o = Out { text: String::new(), stanza: agent.stanza_name().replace(['"', '\\', '\n'], "_") };
    o.one("pgkeep_agent_up", "The agent serves.", Some(1.0));
    let status = agent.status().await.ok();
    o.one("pgkeep_pg_up", "The local PostgreSQL answers.", Some(if status.is_some() { 1.0 } else { 0.0 }));
    let mut last_archived = None;
    if let Some(s) = &status {
        o.one("pgkeep_pg_primary", "1 on the primary, 0 on a standby.", Some(if s.role == Role::Primary { 1.0 } else { 0.0 }));
        if s.role == Role::Primary {
            last_archived = s.archive.last_archived_time.as_deref().and_then(unix);
            o.one("pgkeep_archive_last_archived_seconds", "When the last WAL segment was archived.", last_archived.map(|t| t as f64));
            o.one(
                "pgkeep_archive_seconds_since_last_archived",
                "Seconds since the last WAL segment was archived.",
                last_archived.map(|t| (Utc::now().timestamp() - t) as f64),
            );
            o.counter("pgkeep_archive_failed_total", "Failed archive attempts since the statistics reset.", s.archive.failed_count as f64);
        }
    }
    if let Ok(info) = agent.info(true).await {
        let backups = info.get("backups").and_then(|b| b.as_array()).cloned().unwrap_or_default();
        o.one("pgkeep_backups", "Backups in the repository.", Some(backups.len() as f64));
        let stop = |b: &serde_json::Value| b.get("stop-time").and_then(|t| t.as_str()).and_then(unix);
        if let Some(first) = backups.first().and_then(stop) {
            o.one("pgkeep_first_recoverability_point_seconds", "The earliest point a restore can reach.", Some(first as f64));
        }
        if let Some(newest) = backups.last() {
            let last = stop(newest).max(last_archived);
            o.one("pgkeep_last_recoverability_point_seconds", "The latest point a restore can reach.", last.map(|t| t as f64));
            let n = |k: &str| newest.get(k).and_then(|v| v.as_u64()).map(|v| v as f64);
            o.one("pgkeep_last_backup_size_bytes", "Database bytes of the newest backup.", n("size"));
            o.one("pgkeep_last_backup_repo_size_bytes", "Stored bytes of the newest backup.", n("repo-size"));
        }
        let mut per_type = Vec::new();
        for kind in ["full", "diff", "incr"] {
            let t = backups.iter().rev().find(|b| b.get("type").and_then(|t| t.as_str()) == Some(kind)).and_then(stop);
            if let Some(t) = t {
                per_type.push((format!("type=\"{kind}\""), t as f64));
            }
        }
        let samples: Vec<(&str, f64)> = per_type.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        if !samples.is_empty() {
            o.gauge("pgkeep_last_backup_seconds", "End of the newest backup of each type.", &samples);
        }
    }
    let finished = agent.jobs().finished();
    let last_of = |state: JobState| finished.iter().rev().find(|j| j.state == state);
    if let Some(j) = last_of(JobState::Completed) {
        let end = j.stopped_at.as_deref().and_then(unix);
        o.one("pgkeep_agent_backup_last_success_seconds", "End of this agent's last successful backup.", end.map(|t| t as f64));
        if let (Some(end), Some(start)) = (end, unix(&j.started_at)) {
            o.one(
                "pgkeep_agent_backup_last_duration_seconds",
                "Duration of this agent's last successful backup.",
                Some((end - start) as f64),
            );
        }
    }
    if let Some(j) = last_of(JobState::Failed) {
        let end = j.stopped_at.as_deref().and_then(unix);
        o.one("pgkeep_agent_backup_last_failure_seconds", "End of this agent's last failed backup.", end.map(|t| t as f64));
    }
    o.text
}
