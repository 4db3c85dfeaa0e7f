//! The `Stanza` reconciler: makes the pods' config and the agents' token
//! Secret, creates the stanza in the repositories (`stanza-create` through
//! the primary's agent, once per system: it refuses a repository that
//! holds another cluster, and says so in the `Ready` condition), and keeps
//! the status (recovery window, backups, archiving health, conditions) as the
//! agents and the repository report them, every minute and whenever one of
//! the stanza's Backups changes.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::context::{Context, MANAGER};
use crate::crd::{ArchiveStatus, Backup, BackupSummary, Phase, Stanza, StanzaStatus};
use crate::error::{Error, Result};
use crate::{pods, render};

/// Reconciles one Stanza.
pub async fn reconcile(stanza: Arc<Stanza>, ctx: Arc<Context>) -> Result<Action> {
    let old = stanza.status.clone().unwrap_or_default();
    apply_config(&stanza, &ctx).await?;
    let token = pods::token(&stanza, &ctx).await?;
    let (candidates, silent) = pods::candidates(&stanza, &ctx, &token).await?;
    // What a refresh that finds no primary cannot see again stays as it was.
    let mut status = StanzaStatus {
        conditions: old.conditions.clone(),
        created_for_system: old.created_for_system.clone(),
        system_id: old.system_id.clone(),
        ..Default::default()
    };
    status.last_failed_backup = last_failed(&stanza, &ctx).await?;
    let primary = candidates.iter().find(|c| c.status.role == pgkeep_agent::api::Role::Primary);
    let ready = match primary {
        None if candidates.is_empty() => Err(format!("no agent of the stanza answers{}", detail(&silent))),
        None => Err(format!("no pod of the stanza runs a primary{}", detail(&silent))),
        Some(p) => {
            status.system_id = Some(p.status.system_id.clone());
            status.created_for_system = old.created_for_system.clone().filter(|s| *s == p.status.system_id);
            if status.created_for_system.is_none() {
                match pods::agent(&stanza, &p.ip, &token).create_stanza().await {
                    Ok(created) => {
                        let now: Vec<String> = created.repos.iter().filter(|(_, new)| *new).map(|(n, _)| n.to_string()).collect();
                        if !now.is_empty() {
                            let note = format!("stanza created for system {} in repository {}", created.system_id, now.join(", "));
                            ctx.event(&*stanza, false, "Created", note).await;
                        }
                        status.created_for_system = Some(created.system_id);
                    }
                    Err(e) => {
                        let why = format!("cannot create the stanza in the repositories: {e}");
                        ctx.event(&*stanza, true, "CreateFailed", why.clone()).await;
                    }
                }
            }
            let a = &p.status.archive;
            status.archive = Some(ArchiveStatus {
                last_archived_wal: a.last_archived_wal.clone(),
                last_archived_time: a.last_archived_time.clone(),
                failed_count: a.failed_count,
                last_failed_wal: a.last_failed_wal.clone(),
                last_failed_time: a.last_failed_time.clone(),
                seconds_since_last_archived: a.last_archived_time.as_deref().and_then(unix).map(|t| Utc::now().timestamp() - t),
            });
            match pods::agent(&stanza, &p.ip, &token).info().await {
                Ok(info) if status.created_for_system.is_some() => {
                    fill_from_info(&mut status, &info);
                    Ok(())
                }
                Ok(_) => Err("the stanza is not created in the repositories yet (see the CreateFailed event)".into()),
                Err(e) => Err(format!("the primary's agent cannot read the repository: {e}")),
            }
        }
    };
    let archiving = status.archive.as_ref().map(|a| match (&a.last_failed_time, &a.last_archived_time) {
        (Some(failed), Some(ok)) if unix(failed) > unix(ok) => {
            Err(format!("the last archive attempt failed ({}); see the PostgreSQL log", a.last_failed_wal.as_deref().unwrap_or("?")))
        }
        (Some(_), None) => Err("no WAL segment was archived, and attempts failed; see the PostgreSQL log".into()),
        _ => Ok(()),
    });
    set_condition(&mut status.conditions, "Ready", &ready);
    if let Some(archiving) = archiving {
        set_condition(&mut status.conditions, "Archiving", &archiving);
    }
    if status != old {
        let api: Api<Stanza> = Api::namespaced(ctx.client.clone(), &stanza.namespace().unwrap_or_default());
        let patch = json!({"apiVersion": "pgkeep.dev/v1alpha1", "kind": "Stanza", "status": status});
        api.patch_status(&stanza.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    Ok(Action::requeue(ctx.settings.stanza_refresh))
}

/// Keeps the ConfigMap with the stanza's pgkeep config
/// ([`crate::render`]), owned by the Stanza.
async fn apply_config(stanza: &Stanza, ctx: &Context) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), &stanza.namespace().unwrap_or_default());
    let owner = stanza.controller_owner_ref(&()).map(|o| vec![o]);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": render::configmap_name(stanza), "ownerReferences": owner,
                     "labels": {"app.kubernetes.io/managed-by": MANAGER}},
        "data": {"pgkeep.toml": render::config_toml(stanza)}
    });
    api.patch(&render::configmap_name(stanza), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm)).await?;
    Ok(())
}

/// What the controller does after an error.
pub fn error_policy(_: Arc<Stanza>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(e.metric_label());
    eprintln!("pgkeep-operator: Stanza: {e}");
    crate::error::requeue_after(e)
}

fn detail(silent: &[String]) -> String {
    if silent.is_empty() {
        String::new()
    } else {
        format!(": {}", silent.join("; "))
    }
}

fn unix(t: &str) -> Option<i64> {
    pgkeep_core::types::parse_rfc3339(t).map(|d| d.timestamp())
}

fn rfc3339(t: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp(t, 0).map(pgkeep_core::types::rfc3339)
}

/// Fills the recovery window and the backup list from the engine's `info`
/// (pure).
pub fn fill_from_info(status: &mut StanzaStatus, info: &serde_json::Value) {
    let backups = info.get("backups").and_then(|b| b.as_array()).cloned().unwrap_or_default();
    let s = |b: &serde_json::Value, k: &str| b.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let n = |b: &serde_json::Value, k: &str| b.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    status.backups = backups
        .iter()
        .filter_map(|b| {
            Some(BackupSummary {
                label: s(b, "label")?,
                kind: s(b, "type")?,
                prior: s(b, "prior"),
                start_time: s(b, "start-time")?,
                stop_time: s(b, "stop-time")?,
                size: n(b, "size"),
                repo_size: n(b, "repo-size"),
            })
        })
        .collect();
    // A restore can reach any point from the end of the oldest backup (it
    // is consistent only there) to the end of the archived WAL.
    status.first_recoverability_point = status.backups.iter().filter_map(|b| unix(&b.stop_time)).min().and_then(rfc3339);
    let newest = status.backups.iter().filter_map(|b| unix(&b.stop_time)).max();
    status.last_successful_backup = newest.and_then(rfc3339);
    let archived = status.archive.as_ref().and_then(|a| a.last_archived_time.as_deref()).and_then(unix);
    status.last_recoverability_point = match newest {
        Some(b) => Some(b.max(archived.unwrap_or(b))).and_then(rfc3339),
        None => None,
    };
}

async fn last_failed(stanza: &Stanza, ctx: &Context) -> Result<Option<String>> {
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &stanza.namespace().unwrap_or_default());
    let name = stanza.name_any();
    Ok(api
        .list(&ListParams::default())
        .await?
        .iter()
        .filter(|b| b.spec.stanza == name)
        .filter_map(|b| b.status.as_ref().filter(|s| s.phase == Phase::Failed).and_then(|s| s.stopped_at.clone()))
        .max_by_key(|t| unix(t)))
}

/// Sets condition `kind` from `state`, keeping its transition time when
/// its status does not change.
fn set_condition(conditions: &mut Vec<Condition>, kind: &str, state: &Result<(), String>) {
    let (status, reason, message) = match state {
        Ok(()) => ("True", "Ok", String::new()),
        Err(m) => ("False", "Failing", m.clone()),
    };
    let previous = conditions.iter().position(|c| c.type_ == kind);
    let transition = match previous.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let c = Condition {
        type_: kind.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: transition,
        observed_generation: None,
    };
    match previous {
        Some(i) => conditions[i] = c,
        None => conditions.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_runs_from_the_oldest_backups_end_to_the_last_archived_segment() {
        let info = json!({"backups": [
            {"label": "A", "type": "full", "prior": null, "start-time": "2026-01-01T00:00:00Z", "stop-time": "2026-01-01T00:10:00Z", "size": 10, "repo-size": 2},
            {"label": "B", "type": "incr", "prior": "A", "start-time": "2026-01-02T00:00:00Z", "stop-time": "2026-01-02T00:01:00Z", "size": 10, "repo-size": 1}
        ]});
        let mut s = StanzaStatus {
            archive: Some(ArchiveStatus { last_archived_time: Some("2026-01-02T05:00:00Z".into()), ..Default::default() }),
            ..Default::default()
        };
        fill_from_info(&mut s, &info);
        assert_eq!(s.first_recoverability_point.as_deref(), Some("2026-01-01T00:10:00Z"));
        assert_eq!(s.last_successful_backup.as_deref(), Some("2026-01-02T00:01:00Z"));
        assert_eq!(s.last_recoverability_point.as_deref(), Some("2026-01-02T05:00:00Z"));
        assert_eq!(s.backups.len(), 2);
        assert_eq!((s.backups[1].kind.as_str(), s.backups[1].prior.as_deref()), ("incr", Some("A")));
        // No backup: nothing is recoverable, whatever was archived.
        let mut empty = StanzaStatus::default();
        fill_from_info(&mut empty, &json!({"backups": []}));
        assert_eq!((empty.first_recoverability_point, empty.last_recoverability_point), (None, None));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut c = Vec::new();
        set_condition(&mut c, "Ready", &Ok(()));
        let t0 = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(&mut c, "Ready", &Ok(()));
        assert_eq!(c[0].last_transition_time, t0);
        set_condition(&mut c, "Ready", &Err("down".into()));
        assert_eq!((c.len(), c[0].status.as_str(), c[0].message.as_str()), (1, "False", "down"));
        assert_ne!(c[0].last_transition_time, t0);
    }
}
