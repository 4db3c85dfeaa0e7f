//! The `Backup` reconciler: `pending` -> `running` -> `completed` | `failed`.
//!
//! - **pending**: waits for its Stanza (created in the repositories), for
//!   no other Backup of the stanza
//!   to run, and for a pod to run it on ([`crate::target`]). Past the
//!   pending deadline with no Stanza, pod or primary, it fails.
//!   Before choosing, it asks every agent of the stanza whether it
//!   already knows this Backup's job (id = the Backup's uid): an operator
//!   that died between starting a job and recording it adopts the job
//!   instead of starting a second one.
//! - **running**: polls the agent of the pod it runs on. The pod gone, or
//!   the agent not knowing the job (it restarted): failed at once, with
//!   the reason. The agent silent for longer than the agent deadline:
//!   failed. A Backup is never left running.
//! - **completed** / **failed**: final; nothing more happens.
//! - Deleted while running: the job is cancelled (its process killed; the
//!   repository keeps an unfinished backup that the next one resumes or
//!   removes). Deleted when completed: the data stays in the repository,
//!   where retention decides, unless `deleteFromRepository` is set.
//!
//! The status is written with server-side apply, whole, under the
//! operator's field manager.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;
use pgkeep_agent::api::{BackupRequest, JobState, JobStatus, PrimaryAddress, Role};
use pgkeep_agent::client::ClientError;
use pgkeep_core::types::{parse_rfc3339, rfc3339};
use serde_json::json;

use crate::context::{Context, MANAGER};
use crate::crd::{Backup, BackupStatus, Phase, Stanza};
use crate::error::{Error, Result};
use crate::pods;

/// The finalizer that lets a deleted running Backup cancel its job.
pub const FINALIZER: &str = "pgkeep.dev/backup";

fn now() -> String {
    rfc3339(Utc::now())
}

fn since(t: Option<&str>) -> Option<chrono::Duration> {
    t.and_then(parse_rfc3339).map(|t| Utc::now() - t)
}

/// How long since the first readable time of `times` (RFC 3339), when
/// that is more than `deadline` before `now` (pure). The times are tried
/// in order (last heartbeat, start, creation): a Backup whose status lost
/// one still has a deadline.
pub fn overdue(times: &[Option<&str>], now: DateTime<Utc>, deadline: std::time::Duration) -> Option<chrono::Duration> {
    let from = times.iter().flatten().find_map(|t| parse_rfc3339(t))?;
    let elapsed = now - from;
    (elapsed.to_std().unwrap_or_default() > deadline).then_some(elapsed)
}

/// Reconciles one Backup.
pub async fn reconcile(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action> {
    let ns = backup.namespace().unwrap_or_default();
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, backup, |event| async {
        match event {
            Finalizer::Apply(b) => apply(&b, &ctx).await,
            Finalizer::Cleanup(b) => cleanup(&b, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What the controller does after an error.
pub fn error_policy(_: Arc<Backup>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(e.metric_label());
    eprintln!("pgkeep-operator: Backup: {e}");
    crate::error::requeue_after(e)
}

async fn apply(b: &Backup, ctx: &Context) -> Result<Action> {
    let status = b.status.clone().unwrap_or_default();
    match status.phase {
        Phase::Completed | Phase::Failed => Ok(Action::await_change()),
        Phase::Pending => start(b, ctx, status).await,
        Phase::Running => follow(b, ctx, status).await,
    }
}

async fn write_status(b: &Backup, ctx: &Context, status: &BackupStatus) -> Result<()> {
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &b.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "pgkeep.dev/v1alpha1", "kind": "Backup", "status": status});
    api.patch_status(&b.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

fn stanza_key(b: &Backup) -> String {
    format!("{}/{}", b.namespace().unwrap_or_default(), b.spec.stanza)
}

/// Stays pending (requeued) while the pending deadline allows, else fails.
async fn wait_or_fail(b: &Backup, ctx: &Context, status: BackupStatus, why: String) -> Result<Action> {
    let created = b.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
    if let Some(waited) = overdue(&[created.as_deref()], Utc::now(), ctx.settings.pending_deadline) {
        let why = format!("{why} (waited {} s)", waited.num_seconds());
        return fail(b, ctx, status, why).await;
    }
    ctx.event(b, true, "Waiting", why).await;
    Ok(Action::requeue(ctx.settings.poll.max(std::time::Duration::from_secs(5))))
}

async fn fail(b: &Backup, ctx: &Context, mut status: BackupStatus, why: String) -> Result<Action> {
    status.phase = Phase::Failed;
    status.stopped_at = Some(now());
    status.error = Some(why.clone());
    write_status(b, ctx, &status).await?;
    ctx.metrics.failed(&stanza_key(b), Utc::now().timestamp());
    ctx.event(b, true, "Failed", format!("backup of stanza {} failed: {why}", b.spec.stanza)).await;
    Ok(Action::await_change())
}

async fn start(b: &Backup, ctx: &Context, status: BackupStatus) -> Result<Action> {
    let ns = b.namespace().unwrap_or_default();
    if b.status.is_none() {
        // Say `pending` at once: `kubectl get` shows the phase while it waits.
        write_status(b, ctx, &status).await?;
    }
    let Some(stanza) = Api::<Stanza>::namespaced(ctx.client.clone(), &ns).get_opt(&b.spec.stanza).await? else {
        let why = format!("Stanza {} does not exist in namespace {ns}", b.spec.stanza);
        return wait_or_fail(b, ctx, status, why).await;
    };
    if stanza.status.as_ref().and_then(|s| s.created_for_system.as_ref()).is_none() {
        let why = stanza
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready" && c.status == "False"))
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "its status says nothing yet".into());
        return wait_or_fail(b, ctx, status, format!("Stanza {} is not ready: {why}", b.spec.stanza)).await;
    }
    let uid = b.uid().unwrap_or_default();
    // One backup of a stanza at a time.
    let all = Api::<Backup>::namespaced(ctx.client.clone(), &ns).list(&ListParams::default()).await?;
    if let Some(other) = all.iter().find(|o| {
        o.spec.stanza == b.spec.stanza && o.uid().as_deref() != Some(&uid) && o.status.as_ref().is_some_and(|s| s.phase == Phase::Running)
    }) {
        ctx.event(b, false, "Queued", format!("Backup {} of the stanza runs; this one waits for it", other.name_any())).await;
        return Ok(Action::requeue(ctx.settings.poll));
    }
    let token = pods::token(&stanza, ctx).await?;
    let (candidates, silent) = pods::candidates(&stanza, ctx, &token).await?;
    // Adopt a job an earlier attempt started.
    for c in &candidates {
        if let Ok(job) = pods::agent(&stanza, &c.ip, &token).backup(&uid).await {
            return record_start(b, ctx, &c.pod, job).await;
        }
    }
    let target = b.spec.target.or(stanza.spec.target).unwrap_or_default();
    let choice = match crate::target::choose(&candidates, target) {
        Ok(c) => c,
        Err(why) => {
            let why = if silent.is_empty() { why } else { format!("{why}; {}", silent.join("; ")) };
            return wait_or_fail(b, ctx, status, why).await;
        }
    };
    let run_on = &candidates[choice.run_on];
    let primary = &candidates[choice.primary];
    let req = BackupRequest {
        id: uid,
        kind: b.spec.kind.as_str().into(),
        repo: b.spec.repository,
        primary: (run_on.status.role == Role::Standby).then(|| PrimaryAddress { host: primary.ip.clone(), port: pods::pg_port(&stanza) }),
    };
    if let Some(why) = &choice.passed_over {
        ctx.event(b, false, "Primary", format!("the backup runs on the primary {}: {why}", primary.pod)).await;
    }
    match pods::agent(&stanza, &run_on.ip, &token).start_backup(&req).await {
        Ok(job) => record_start(b, ctx, &run_on.pod, job).await,
        Err(e) if e.retryable() => Err(e.into()),
        Err(e) => fail(b, ctx, status, format!("the agent on pod {} refused the backup: {e}", run_on.pod)).await,
    }
}

async fn record_start(b: &Backup, ctx: &Context, pod: &str, job: JobStatus) -> Result<Action> {
    let status = BackupStatus {
        phase: Phase::Running,
        pod: Some(pod.to_owned()),
        role: Some(role_name(job.role).into()),
        job: Some(job.id.clone()),
        started_at: Some(job.started_at.clone()),
        last_heartbeat: Some(now()),
        ..Default::default()
    };
    write_status(b, ctx, &status).await?;
    ctx.metrics.started(&stanza_key(b));
    let what = format!("{} backup of stanza {} started on pod {pod} ({})", b.spec.kind.as_str(), b.spec.stanza, role_name(job.role));
    ctx.event(b, false, "Started", what).await;
    // The job may have ended already (an adopted one): look now.
    settle(b, ctx, status, job).await
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Standby => "standby",
    }
}

async fn follow(b: &Backup, ctx: &Context, mut status: BackupStatus) -> Result<Action> {
    let ns = b.namespace().unwrap_or_default();
    let (Some(pod_name), Some(job_id)) = (status.pod.clone(), status.job.clone()) else {
        return fail(b, ctx, status, "the status lost its pod and job: create another Backup".into()).await;
    };
    let pod = Api::<Pod>::namespaced(ctx.client.clone(), &ns).get_opt(&pod_name).await?;
    let Some(ip) = pod.as_ref().filter(|p| p.metadata.deletion_timestamp.is_none()).and_then(pods::pod_ip) else {
        let why = match pod {
            None => format!("pod {pod_name} disappeared while the backup ran on it"),
            Some(_) => format!("pod {pod_name} is being deleted or lost its IP while the backup ran on it"),
        };
        return fail(b, ctx, status, why).await;
    };
    let Some(stanza) = Api::<Stanza>::namespaced(ctx.client.clone(), &ns).get_opt(&b.spec.stanza).await? else {
        return fail(b, ctx, status, format!("Stanza {} was deleted while the backup ran", b.spec.stanza)).await;
    };
    let token = pods::token(&stanza, ctx).await?;
    match pods::agent(&stanza, &ip, &token).backup(&job_id).await {
        Ok(job) => {
            if job.state == JobState::Running && since(status.last_heartbeat.as_deref()).is_none_or(|d| d.num_seconds() >= 15) {
                status.last_heartbeat = Some(now());
                write_status(b, ctx, &status).await?;
            }
            settle(b, ctx, status, job).await
        }
        Err(ClientError::NotFound(_)) => {
            let why = format!("the agent on pod {pod_name} no longer knows this backup: it restarted while the backup ran");
            fail(b, ctx, status, why).await
        }
        Err(e) => {
            let created = b.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
            let times = [status.last_heartbeat.as_deref(), status.started_at.as_deref(), created.as_deref()];
            if let Some(silent) = overdue(&times, Utc::now(), ctx.settings.agent_deadline) {
                let why = format!("the agent on pod {pod_name} has not answered for {} s: {e}", silent.num_seconds());
                return fail(b, ctx, status, why).await;
            }
            Ok(Action::requeue(ctx.settings.poll))
        }
    }
}

/// Records a finished job, or requeues a running one.
async fn settle(b: &Backup, ctx: &Context, mut status: BackupStatus, job: JobStatus) -> Result<Action> {
    match job.state {
        JobState::Running => Ok(Action::requeue(ctx.settings.poll)),
        JobState::Failed => {
            let why = job.error.unwrap_or_else(|| "the agent gave no reason".into());
            fail(b, ctx, status, why).await
        }
        JobState::Completed => {
            let Some(r) = job.backup else {
                return fail(b, ctx, status, "the agent reported success without the backup's details".into()).await;
            };
            status.phase = Phase::Completed;
            status.label = Some(r.label.clone());
            status.kind = Some(r.kind.clone());
            status.started_at = Some(r.start_time.clone());
            status.stopped_at = Some(r.stop_time.clone());
            status.begin_lsn = Some(r.start_lsn);
            status.end_lsn = Some(r.stop_lsn);
            status.begin_wal = Some(r.start_wal);
            status.end_wal = Some(r.stop_wal);
            status.size = Some(r.size);
            status.repo_size = Some(r.repo_size);
            status.error = None;
            write_status(b, ctx, &status).await?;
            let seconds = match (parse_rfc3339(&r.start_time), parse_rfc3339(&r.stop_time)) {
                (Some(a), Some(z)) => (z - a).num_milliseconds() as f64 / 1000.0,
                _ => 0.0,
            };
            ctx.metrics.completed(&stanza_key(b), Utc::now().timestamp(), seconds, r.size, r.repo_size);
            let mut note = format!(
                "{} backup {} of stanza {} completed on pod {}",
                r.kind,
                r.label,
                b.spec.stanza,
                status.pod.as_deref().unwrap_or("?")
            );
            if let Some(n) = r.notice {
                note = format!("{note}; {n}");
            }
            if let Some(w) = r.warning {
                note = format!("{note}; {w}");
            }
            ctx.event(b, false, "Completed", note).await;
            Ok(Action::await_change())
        }
    }
}

/// A completed Backup with `deleteFromRepository`, deleted: its data goes
/// too, through any agent of the stanza. Refused by the engine (later
/// backups depend on it, or no agent answers for the agent deadline): the
/// data stays, a Warning says why, and the Backup goes all the same (a
/// finalizer that never lets go is worse than data left to retention).
async fn delete_data(b: &Backup, ctx: &Context, status: &BackupStatus) -> Result<Action> {
    let Some(label) = status.label.as_deref() else { return Ok(Action::await_change()) };
    let ns = b.namespace().unwrap_or_default();
    let Some(stanza) = Api::<Stanza>::namespaced(ctx.client.clone(), &ns).get_opt(&b.spec.stanza).await? else {
        ctx.event(b, true, "Kept", format!("backup {label} stays in the repository: Stanza {} no longer exists", b.spec.stanza)).await;
        return Ok(Action::await_change());
    };
    let token = pods::token(&stanza, ctx).await?;
    let (mut candidates, silent) = pods::candidates(&stanza, ctx, &token).await?;
    // The primary first: it is the one that surely reaches the repository.
    candidates.sort_by_key(|c| c.status.role != Role::Primary);
    let why = match candidates.first() {
        Some(c) => match pods::agent(&stanza, &c.ip, &token).expire(label).await {
            Ok(_) => {
                ctx.event(b, false, "Deleted", format!("backup {label} deleted from the repository")).await;
                return Ok(Action::await_change());
            }
            Err(ClientError::NotFound(_)) => return Ok(Action::await_change()),
            Err(e) if e.retryable() && !deadline_passed(b, ctx) => return Err(e.into()),
            Err(e) => e.to_string(),
        },
        // Tried again soon (retryable), until the agent deadline.
        None if !deadline_passed(b, ctx) => {
            return Err(ClientError::Unreachable(format!("any pod of stanza {}", b.spec.stanza), silent.join("; ")).into())
        }
        None => format!("no agent of the stanza answers: {}", silent.join("; ")),
    };
    ctx.event(b, true, "Kept", format!("backup {label} stays in the repository: {why}")).await;
    Ok(Action::await_change())
}

/// Whether the Backup has been deleted for longer than the agent deadline.
fn deadline_passed(b: &Backup, ctx: &Context) -> bool {
    let deleted = b.metadata.deletion_timestamp.as_ref().map(|t| t.0.to_string());
    overdue(&[deleted.as_deref()], Utc::now(), ctx.settings.agent_deadline).is_some()
}

async fn cleanup(b: &Backup, ctx: &Context) -> Result<Action> {
    let status = b.status.clone().unwrap_or_default();
    if status.phase == Phase::Completed && b.spec.delete_from_repository {
        return delete_data(b, ctx, &status).await;
    }
    if status.phase != Phase::Running {
        // A completed backup stays in the repository: retention decides.
        return Ok(Action::await_change());
    }
    let ns = b.namespace().unwrap_or_default();
    let (Some(pod_name), Some(job)) = (status.pod.as_deref(), status.job.as_deref()) else { return Ok(Action::await_change()) };
    let pod = Api::<Pod>::namespaced(ctx.client.clone(), &ns).get_opt(pod_name).await?;
    let stanza = Api::<Stanza>::namespaced(ctx.client.clone(), &ns).get_opt(&b.spec.stanza).await?;
    if let (Some(ip), Some(stanza)) = (pod.as_ref().and_then(pods::pod_ip), stanza) {
        let token = pods::token(&stanza, ctx).await?;
        match pods::agent(&stanza, &ip, &token).cancel(job).await {
            Ok(_) | Err(ClientError::NotFound(_)) => {}
            // The agent must hear it: an unreachable one is tried again,
            // up to the agent deadline, after which the pod is taken for
            // gone (its backup with it).
            Err(e)
                if e.retryable()
                    && since(status.last_heartbeat.as_deref())
                        .is_some_and(|d| d.to_std().unwrap_or_default() < ctx.settings.agent_deadline) =>
            {
                return Err(e.into());
            }
            Err(e) => eprintln!("pgkeep-operator: cannot cancel backup {job} on pod {pod_name}: {e}"),
        }
    }
    ctx.event(b, true, "Cancelled", format!("the Backup was deleted while running on pod {pod_name}: its job was cancelled")).await;
    ctx.metrics.failed(&stanza_key(b), Utc::now().timestamp());
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_deadline_counts_from_the_first_readable_time_and_is_strict() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:01:00Z").unwrap().with_timezone(&Utc);
        let minute = Duration::from_secs(60);
        // Exactly at the deadline: not yet.
        assert_eq!(overdue(&[Some("2026-01-01T00:00:00Z")], now, minute), None);
        assert_eq!(overdue(&[Some("2025-12-31T23:59:59Z")], now, minute).map(|d| d.num_seconds()), Some(61));
        // The heartbeat first; a missing or unreadable one falls back to
        // the start, then the creation.
        let recent = Some("2026-01-01T00:00:50Z");
        assert_eq!(overdue(&[recent, Some("2025-01-01T00:00:00Z")], now, minute), None);
        assert!(overdue(&[None, Some("garbage"), Some("2025-01-01T00:00:00Z")], now, minute).is_some());
        // Nothing readable: no verdict (the caller has the creation time).
        assert_eq!(overdue(&[None, Some("x")], now, minute), None);
        // A clock that went back: not overdue.
        assert_eq!(overdue(&[Some("2026-01-01T00:05:00Z")], now, minute), None);
    }
}
