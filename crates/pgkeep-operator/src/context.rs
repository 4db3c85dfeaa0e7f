//! What every reconciler gets: the client, the event recorder, the
//! metrics and the operator's settings (controller-rs's `Context`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

/// The field manager of the operator's server-side applies.
pub const MANAGER: &str = "pgkeep-operator";

/// Settings of the operator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a running backup's agent may stay silent before the
    /// Backup is failed.
    pub agent_deadline: Duration,
    /// How long a Backup may stay pending (no Stanza, no pod, no
    /// primary) before it is failed.
    pub pending_deadline: Duration,
    /// How often a running backup is polled.
    pub poll: Duration,
    /// How often a Stanza's status is refreshed.
    pub stanza_refresh: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent_deadline: Duration::from_secs(60),
            pending_deadline: Duration::from_secs(300),
            poll: Duration::from_secs(5),
            stanza_refresh: Duration::from_secs(60),
        }
    }
}

/// Shared by the reconcilers.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub settings: Settings,
}

impl Context {
    /// A context over `client`.
    pub fn new(client: Client, settings: Settings) -> Context {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context { recorder: Recorder::new(client.clone(), reporter), client, metrics: Metrics::default(), settings }
    }

    /// Publishes an Event on `obj`; a failure to publish is logged, not
    /// fatal (events are a courtesy, the status is the record).
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, warning: bool, reason: &str, note: String) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            eprintln!("pgkeep-operator: cannot publish event {reason}: {e}");
        }
    }
}

/// The operator's own metrics, per stanza (`namespace/name`).
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<MetricsInner>,
}

#[derive(Default)]
struct MetricsInner {
    per_stanza: BTreeMap<String, StanzaMetrics>,
    reconcile_errors: BTreeMap<&'static str, u64>,
}

#[derive(Default, Clone)]
struct StanzaMetrics {
    started: u64,
    completed: u64,
    failed: u64,
    skipped: u64,
    last_success: Option<i64>,
    last_failure: Option<i64>,
    last_duration: Option<f64>,
    last_size: Option<u64>,
    last_repo_size: Option<u64>,
}

impl Metrics {
    fn with(&self, stanza: &str, f: impl FnOnce(&mut StanzaMetrics)) {
        f(self.inner.lock().unwrap().per_stanza.entry(stanza.to_owned()).or_default());
    }

    /// A backup started.
    pub fn started(&self, stanza: &str) {
        self.with(stanza, |m| m.started += 1);
    }

    /// A backup completed at `at` (Unix seconds) after `seconds`.
    pub fn completed(&self, stanza: &str, at: i64, seconds: f64, size: u64, repo_size: u64) {
        self.with(stanza, |m| {
            m.completed += 1;
            m.last_success = Some(at);
            m.last_duration = Some(seconds);
            m.last_size = Some(size);
            m.last_repo_size = Some(repo_size);
        });
    }

    /// A backup failed at `at`.
    pub fn failed(&self, stanza: &str, at: i64) {
        self.with(stanza, |m| {
            m.failed += 1;
            m.last_failure = Some(at);
        });
    }

    /// A scheduled tick was skipped.
    pub fn skipped(&self, stanza: &str) {
        self.with(stanza, |m| m.skipped += 1);
    }

    /// A reconcile failed.
    pub fn reconcile_error(&self, kind: &'static str) {
        *self.inner.lock().unwrap().reconcile_errors.entry(kind).or_default() += 1;
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, get: &dyn Fn(&StanzaMetrics) -> Option<f64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (stanza, m) in &inner.per_stanza {
                if let Some(v) = get(m) {
                    let (ns, name_) = stanza.split_once('/').unwrap_or(("", stanza));
                    let _ = writeln!(out, "{name}{{namespace=\"{ns}\",stanza=\"{name_}\"}} {v}");
                }
            }
        };
        family("pgkeep_operator_backups_started_total", "counter", "Backups started.", &|m| Some(m.started as f64));
        family("pgkeep_operator_backups_completed_total", "counter", "Backups completed.", &|m| Some(m.completed as f64));
        family("pgkeep_operator_backups_failed_total", "counter", "Backups failed.", &|m| Some(m.failed as f64));
        family("pgkeep_operator_scheduled_skipped_total", "counter", "Scheduled ticks skipped because a backup ran.", &|m| {
            Some(m.skipped as f64)
        });
        family(
            "pgkeep_operator_last_backup_success_seconds",
            "gauge",
            "When the operator saw the last successful backup complete.",
            &|m| m.last_success.map(|v| v as f64),
        );
        family("pgkeep_operator_last_backup_failure_seconds", "gauge", "When the operator saw the last backup fail.", &|m| {
            m.last_failure.map(|v| v as f64)
        });
        family("pgkeep_operator_last_backup_duration_seconds", "gauge", "Duration of the last successful backup.", &|m| m.last_duration);
        family("pgkeep_operator_last_backup_size_bytes", "gauge", "Database bytes of the last successful backup.", &|m| {
            m.last_size.map(|v| v as f64)
        });
        family("pgkeep_operator_last_backup_repo_size_bytes", "gauge", "Stored bytes of the last successful backup.", &|m| {
            m.last_repo_size.map(|v| v as f64)
        });
        let _ = writeln!(out, "# HELP pgkeep_operator_reconcile_errors_total Reconciles that failed, by cause.");
        let _ = writeln!(out, "# TYPE pgkeep_operator_reconcile_errors_total counter");
        for (kind, n) in &inner.reconcile_errors {
            let _ = writeln!(out, "pgkeep_operator_reconcile_errors_total{{cause=\"{kind}\"}} {n}");
        }
        out
    }
}
