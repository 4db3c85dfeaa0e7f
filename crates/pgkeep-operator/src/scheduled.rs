//! The `ScheduledBackup` reconciler: makes a `Backup` per due tick
//! ([`crate::schedule::decide`]), at most one running per stanza: a tick
//! that finds a Backup of the stanza pending or running is recorded as
//! skipped (status `lastSkippedTime`, a Warning event) and consumed.
//!
//! Restart-safe: the Backup of a tick has a name derived from the tick
//! ([`crate::schedule::backup_name`]), so an operator that created it and
//! died before recording `lastScheduleTime` finds it exists (409) and
//! records the tick; it never makes two.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use pgkeep_core::types::{parse_rfc3339, rfc3339};
use serde_json::json;

use crate::context::{Context, MANAGER};
use crate::crd::{Backup, BackupSpec, OwnerReferenceKind, Phase, ScheduledBackup, ScheduledBackupStatus, Stanza};
use crate::error::{Error, Result};
use crate::schedule::{self, Decision, Schedule};

/// The label each Backup made carries, naming its ScheduledBackup.
pub const LABEL: &str = "pgkeep.dev/scheduled-backup";

/// Reconciles one ScheduledBackup.
pub async fn reconcile(sb: Arc<ScheduledBackup>, ctx: Arc<Context>) -> Result<Action> {
    let old = sb.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let schedule = match Schedule::parse(&sb.spec.schedule, sb.spec.timezone.as_deref()) {
        Ok(s) => s,
        Err(why) => {
            status.last_error = Some(format!("spec.schedule: {why}"));
            status.next_schedule_time = None;
            write_status(&sb, &ctx, &old, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let now = Utc::now();
    let created = sb.metadata.creation_timestamp.as_ref().and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0)).unwrap_or(now);
    let last = old.last_schedule_time.as_deref().and_then(parse_rfc3339);
    if sb.spec.suspend {
        status.next_schedule_time = None;
        status.last_error = None;
        write_status(&sb, &ctx, &old, &status).await?;
        return Ok(Action::await_change());
    }
    match schedule::decide(&schedule, last, created, now, sb.spec.immediate) {
        Decision::Wait { next } => {
            status.next_schedule_time = next.map(rfc3339);
            write_status(&sb, &ctx, &old, &status).await?;
            Ok(wait_until(next, now))
        }
        Decision::Fire { tick, missed } => {
            let outcome = fire(&sb, &ctx, tick, missed).await;
            status.last_schedule_time = Some(rfc3339(tick));
            let next = schedule.next_after(tick.max(now));
            status.next_schedule_time = next.map(rfc3339);
            match outcome {
                Ok(Fired::Made) => status.last_error = None,
                Ok(Fired::Skipped) => {
                    status.last_skipped_time = Some(rfc3339(tick));
                    status.last_error = None;
                }
                Err(e) if e.retryable() => return Err(e),
                // Not retryable (a missing Stanza...): the tick is consumed
                // and the error shown; the next tick tries again.
                Err(e) => status.last_error = Some(e.to_string()),
            }
            write_status(&sb, &ctx, &old, &status).await?;
            Ok(wait_until(next, Utc::now()))
        }
    }
}

/// Requeues at the next tick, and at least every five minutes (a clock
/// that moved, or an edit that was missed, is seen then).
fn wait_until(next: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Action {
    let five_minutes = Duration::from_secs(300);
    match next.map(|n| (n - now).to_std().unwrap_or_default()) {
        Some(d) => Action::requeue(d.min(five_minutes) + Duration::from_millis(50)),
        None => Action::requeue(five_minutes),
    }
}

/// What the controller does after an error.
pub fn error_policy(_: Arc<ScheduledBackup>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(e.metric_label());
    eprintln!("pgkeep-operator: ScheduledBackup: {e}");
    crate::error::requeue_after(e)
}

async fn write_status(sb: &ScheduledBackup, ctx: &Context, old: &ScheduledBackupStatus, new: &ScheduledBackupStatus) -> Result<()> {
    if old == new {
        return Ok(());
    }
    let api: Api<ScheduledBackup> = Api::namespaced(ctx.client.clone(), &sb.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "pgkeep.dev/v1alpha1", "kind": "ScheduledBackup", "status": new});
    api.patch_status(&sb.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// The owner reference of the Backups `sb` makes (pure): none, the
/// ScheduledBackup as their controller (deleted with it), or the Stanza
/// (deleted with it; not as controller, which stays free).
pub fn owner_reference(kind: OwnerReferenceKind, sb: &ScheduledBackup, stanza: Option<&Stanza>) -> Option<OwnerReference> {
    match kind {
        OwnerReferenceKind::None => None,
        OwnerReferenceKind::Itself => sb.controller_owner_ref(&()),
        OwnerReferenceKind::Stanza => stanza?.controller_owner_ref(&()).map(|o| OwnerReference { controller: Some(false), ..o }),
    }
}

enum Fired {
    Made,
    Skipped,
}

async fn fire(sb: &ScheduledBackup, ctx: &Context, tick: DateTime<Utc>, missed: u64) -> Result<Fired> {
    let ns = sb.namespace().unwrap_or_default();
    let backups: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    let name = schedule::backup_name(&sb.name_any(), tick);
    if backups.get_opt(&name).await?.is_some() {
        return Ok(Fired::Made);
    }
    let busy = backups
        .list(&ListParams::default())
        .await?
        .into_iter()
        .find(|b| b.spec.stanza == sb.spec.stanza && !b.status.as_ref().map(|s| s.phase).unwrap_or(Phase::Pending).is_final());
    let stanza_key = format!("{ns}/{}", sb.spec.stanza);
    if let Some(b) = busy {
        ctx.metrics.skipped(&stanza_key);
        let note = format!("tick {} skipped: Backup {} of stanza {} has not finished", rfc3339(tick), b.name_any(), sb.spec.stanza);
        ctx.event(sb, true, "Skipped", note).await;
        return Ok(Fired::Skipped);
    }
    let stanza = match sb.spec.backup_owner_reference {
        OwnerReferenceKind::Stanza => match Api::<Stanza>::namespaced(ctx.client.clone(), &ns).get_opt(&sb.spec.stanza).await? {
            Some(s) => Some(s),
            None => {
                return Err(Error::Invalid(format!(
                    "backupOwnerReference is 'stanza' but Stanza {} does not exist in namespace {ns}",
                    sb.spec.stanza
                )))
            }
        },
        _ => None,
    };
    let owner = owner_reference(sb.spec.backup_owner_reference, sb, stanza.as_ref());
    let backup = Backup {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            labels: Some([(LABEL.to_owned(), sb.name_any().chars().take(63).collect())].into()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: BackupSpec {
            stanza: sb.spec.stanza.clone(),
            kind: sb.spec.kind,
            target: sb.spec.target,
            repository: None,
            delete_from_repository: false,
        },
        status: None,
    };
    match backups.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &backup).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let mut note = format!("Backup {name} made for tick {}", rfc3339(tick));
    if missed > 0 {
        note = format!("{note}; {missed} earlier ticks were missed while the operator was down or the schedule suspended");
    }
    ctx.event(sb, false, "Scheduled", note).await;
    Ok(Fired::Made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<K: serde::de::DeserializeOwned>(kind: &str, spec: serde_json::Value) -> K {
        serde_json::from_value(json!({"apiVersion": "pgkeep.dev/v1alpha1", "kind": kind,
            "metadata": {"name": format!("{}-x", kind.to_lowercase()), "namespace": "db", "uid": format!("uid-{kind}")}, "spec": spec}))
        .unwrap()
    }

    #[test]
    fn backups_are_owned_as_backup_owner_reference_says() {
        let sb: ScheduledBackup = obj("ScheduledBackup", json!({"stanza": "main", "schedule": "0 0 * * *"}));
        let stanza: Stanza = obj("Stanza", json!({"selector": {}, "repositories": [{"destinationPath": "/b"}]}));
        assert_eq!(owner_reference(OwnerReferenceKind::None, &sb, Some(&stanza)), None);
        let own = owner_reference(OwnerReferenceKind::Itself, &sb, None).unwrap();
        assert_eq!((own.kind.as_str(), own.uid.as_str(), own.controller), ("ScheduledBackup", "uid-ScheduledBackup", Some(true)));
        let st = owner_reference(OwnerReferenceKind::Stanza, &sb, Some(&stanza)).unwrap();
        assert_eq!((st.kind.as_str(), st.name.as_str(), st.controller), ("Stanza", "stanza-x", Some(false)));
        assert_eq!(owner_reference(OwnerReferenceKind::Stanza, &sb, None), None);
        // The default is self.
        assert_eq!(sb.spec.backup_owner_reference, OwnerReferenceKind::Itself);
    }
}
