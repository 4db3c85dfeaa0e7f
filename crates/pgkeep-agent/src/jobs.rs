//! Backup jobs. Each runs as a child process of the agent, the same
//! `pgkeep` binary with `backup --output json`: cancelling one is the
//! engine's most tested failure, a killed process (the repository keeps
//! an unfinished backup, and its lock, held by a dead process, is taken
//! over by the next run); a crash in a backup cannot take the agent down;
//! and what a backup allocates is returned when it ends. Status, info and
//! metrics, which are cheap, run inside the agent on the embedded engine.
//!
//! Jobs live in memory: an agent that restarts knows none, and the
//! operator, asking for its job, hears 404 and marks the Backup failed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::io::AsyncReadExt;

use crate::api::{BackupRequest, BackupResult, JobState, JobStatus, PrimaryAddress, Role};

/// Jobs kept once finished, newest last.
const KEEP_FINISHED: usize = 64;

/// How to run the `pgkeep` binary for a backup.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The binary.
    pub exe: PathBuf,
    /// Global arguments (`--config FILE --stanza NAME`).
    pub global: Vec<String>,
    /// This pod's data directory and local server address (socket
    /// directory and port), used when a backup reads this standby.
    pub pg_data: String,
    /// Local socket directory or host.
    pub pg_host: String,
    /// Local port.
    pub pg_port: u16,
    /// When set, a stanza's config is `DIR/<stanza>.toml` (see
    /// [`Runner::for_stanza`]).
    pub config_dir: Option<PathBuf>,
    /// A standby is backed up alone (`backup-standby = local`, no primary
    /// in the request), waiting this many seconds for its last WAL
    /// segment to be archived by the primary.
    pub standby_alone: Option<u64>,
    /// Connection flags of this process passed on (`--pg-data`,
    /// `--pg-host`...), as (flag, value); a standby's backup replaces the
    /// ones it sets.
    pub pg_flags: Vec<(String, String)>,
}

impl Runner {
    /// This runner for stanza `name` (replacing the `--stanza` of its
    /// global arguments, or adding one).
    pub fn for_stanza(&self, name: &str) -> Runner {
        let mut r = self.clone();
        let mut set = |flag: &str, value: String| match r.global.iter().position(|a| a == flag) {
            Some(i) if i + 1 < r.global.len() => r.global[i + 1] = value,
            _ => r.global.extend([flag.to_owned(), value]),
        };
        if let Some(dir) = &self.config_dir {
            set("--config", dir.join(format!("{name}.toml")).display().to_string());
        }
        set("--stanza", name.to_owned());
        r
    }

    /// The arguments of a backup: on a standby, the engine connects to the
    /// primary named by the request, reads this pod's data directory, and
    /// starts and stops the backup on the local standby
    /// (`backup-standby = y`: never silently the primary's files, which
    /// are not in this pod).
    pub fn args(&self, req: &BackupRequest, role: Role) -> Vec<String> {
        let mut a = self.global.clone();
        a.extend(["--output".into(), "json".into()]);
        if let Some(repo) = req.repo {
            a.extend(["--repo".into(), repo.to_string()]);
        }
        let mut flags = self.pg_flags.clone();
        let mut set = |flag: &str, value: String| {
            flags.retain(|(f, _)| f != flag);
            flags.push((flag.to_owned(), value));
        };
        match (role, &req.primary, self.standby_alone) {
            (Role::Standby, Some(PrimaryAddress { host, port }), _) => {
                set("--pg-host", host.clone());
                set("--pg-port", port.to_string());
                set("--backup-standby", "y".into());
                set("--standby-data", self.pg_data.clone());
                set("--standby-host", self.pg_host.clone());
                set("--standby-port", self.pg_port.to_string());
            }
            (Role::Standby, None, Some(wait)) => {
                set("--backup-standby", "local".into());
                set("--archive-timeout", wait.to_string());
            }
            _ => {}
        }
        a.extend(flags.into_iter().flat_map(|(f, v)| [f, v]));
        a.extend(["backup".into(), "--type".into(), req.kind.clone()]);
        a
    }
}

struct Job {
    status: JobStatus,
    /// The child's pid while it runs.
    pid: Option<u32>,
    seq: u64,
}

/// The agent's jobs.
#[derive(Default)]
pub struct Jobs {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, Job>,
    seq: u64,
}

/// Why a job was not started.
#[derive(Debug)]
pub enum StartError {
    /// Another job runs.
    Busy(String),
    /// The request is malformed.
    Invalid(String),
    /// The child could not be started.
    Spawn(String),
}

impl Jobs {
    /// The job `id`, if known.
    pub fn get(&self, id: &str) -> Option<JobStatus> {
        self.inner.lock().unwrap().jobs.get(id).map(|j| j.status.clone())
    }

    /// The id of the running job, if any.
    pub fn running(&self) -> Option<String> {
        let inner = self.inner.lock().unwrap();
        inner.jobs.values().find(|j| j.status.state == JobState::Running).map(|j| j.status.id.clone())
    }

    /// Every finished job, oldest first.
    pub fn finished(&self) -> Vec<JobStatus> {
        let inner = self.inner.lock().unwrap();
        let mut v: Vec<_> = inner.jobs.values().filter(|j| j.status.state != JobState::Running).collect();
        v.sort_by_key(|j| j.seq);
        v.into_iter().map(|j| j.status.clone()).collect()
    }

    /// Forgets job `id` if it failed, so that the same id may run again.
    pub fn forget_failed(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap();
        if inner.jobs.get(id).is_some_and(|j| j.status.state == JobState::Failed) {
            inner.jobs.remove(id);
        }
    }

    /// Starts the backup of `req` (or answers the job of the same id).
    pub fn start(self: &Arc<Self>, runner: &Runner, req: BackupRequest, role: Role) -> Result<JobStatus, StartError> {
        if req.id.is_empty() || req.id.len() > 128 {
            return Err(StartError::Invalid("id must be 1 to 128 characters".into()));
        }
        if !matches!(req.kind.as_str(), "full" | "diff" | "incr") {
            return Err(StartError::Invalid(format!("type '{}' is not full, diff or incr", req.kind)));
        }
        if role == Role::Standby && req.primary.is_none() && runner.standby_alone.is_none() {
            return Err(StartError::Invalid("this server is a standby: the request must name the primary".into()));
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some(job) = inner.jobs.get(&req.id) {
            return Ok(job.status.clone());
        }
        if let Some(other) = inner.jobs.values().find(|j| j.status.state == JobState::Running) {
            return Err(StartError::Busy(other.status.id.clone()));
        }
        let mut cmd = tokio::process::Command::new(&runner.exe);
        cmd.args(runner.args(&req, role)).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        // Its own process group, so that cancel kills whatever it started
        // too: a process left behind would hold the output pipes open and
        // the job would look running until it ended by itself.
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(|e| StartError::Spawn(format!("cannot run {}: {e}", runner.exe.display())))?;
        let status = JobStatus {
            id: req.id.clone(),
            state: JobState::Running,
            role,
            started_at: now(),
            stopped_at: None,
            done_bytes: 0,
            total_bytes: 0,
            backup: None,
            error: None,
        };
        inner.seq += 1;
        let seq = inner.seq;
        inner.jobs.insert(req.id.clone(), Job { status: status.clone(), pid: child.id(), seq });
        drop(inner);
        let jobs = self.clone();
        tokio::spawn(async move {
            let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let (_, _, exit) = tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr), child.wait());
            jobs.finish(&req.id, exit.ok().and_then(|s| s.code()), &stdout, &stderr);
        });
        Ok(status)
    }

    fn finish(&self, id: &str, code: Option<i32>, stdout: &[u8], stderr: &[u8]) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(job) = inner.jobs.get_mut(id) {
            job.pid = None;
            job.status.stopped_at = Some(now());
            let cancelled = job.status.error.is_some();
            match (code, parse_result(stdout)) {
                (Some(0), Some(result)) if !cancelled => {
                    job.status.state = JobState::Completed;
                    job.status.done_bytes = result.size;
                    job.status.total_bytes = result.size;
                    job.status.backup = Some(result);
                }
                _ => {
                    job.status.state = JobState::Failed;
                    if job.status.error.is_none() {
                        job.status.error = Some(failure_line(code, stderr));
                    }
                }
            }
        }
        // Forget the oldest finished jobs beyond the limit.
        let mut finished: Vec<(u64, String)> =
            inner.jobs.values().filter(|j| j.status.state != JobState::Running).map(|j| (j.seq, j.status.id.clone())).collect();
        finished.sort();
        let excess = finished.len().saturating_sub(KEEP_FINISHED);
        for (_, id) in finished.into_iter().take(excess) {
            inner.jobs.remove(&id);
        }
    }

    /// Cancels job `id`: kills its process. Answers the job, or `None`
    /// when unknown.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(id)?;
        if let Some(pid) = job.pid {
            if job.status.error.is_none() {
                job.status.error = Some("cancelled: the Backup was deleted or the agent was asked to stop it".into());
            }
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
        Some(job.status.clone())
    }
}

fn now() -> String {
    pgkeep_core::types::rfc3339(Utc::now())
}

/// Reads `pgkeep backup --output json`.
fn parse_result(stdout: &[u8]) -> Option<BackupResult> {
    let v: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64());
    Some(BackupResult {
        label: s("label")?,
        kind: s("type")?,
        start_time: s("start-time")?,
        stop_time: s("stop-time")?,
        start_lsn: s("start-lsn")?,
        stop_lsn: s("stop-lsn")?,
        start_wal: s("start-wal")?,
        stop_wal: s("stop-wal")?,
        size: n("size")?,
        repo_size: n("repo-size")?,
        notice: match (s("full-because"), s("standby-passed-over")) {
            (Some(full), _) => Some(format!("a full backup because {full}")),
            (None, Some(why)) => Some(format!("read the primary because {why}")),
            (None, None) => None,
        },
        warning: s("expire-failed").map(|e| format!("the backup stands but retention failed: {e}")),
    })
}

/// The one line that says why a backup failed: the engine's last line on
/// stderr (it prints "pgkeep: what is wrong ..."), else how it ended.
fn failure_line(code: Option<i32>, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().rev().map(str::trim).find(|l| l.starts_with("pgkeep: ") && !l.contains("WARNING") && !l.contains("NOTICE"));
    match (last, code) {
        (Some(line), _) => line.trim_start_matches("pgkeep: ").to_owned(),
        (None, Some(c)) => format!("the backup process exited with status {c} without saying why"),
        (None, None) => "the backup process was killed".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> Runner {
        Runner {
            exe: "/bin/false".into(),
            global: vec!["--stanza".into(), "demo".into()],
            pg_data: "/pgdata".into(),
            pg_host: "/run/pg".into(),
            pg_port: 5432,
            config_dir: None,
            standby_alone: None,
            pg_flags: Vec::new(),
        }
    }

    fn req(kind: &str, primary: Option<PrimaryAddress>) -> BackupRequest {
        BackupRequest { id: "u1".into(), kind: kind.into(), repo: None, primary }
    }

    #[test]
    fn a_standby_backup_reads_the_local_data_and_asks_the_named_primary() {
        let r = runner();
        let primary = PrimaryAddress { host: "10.0.0.7".into(), port: 5433 };
        let a = r.args(&req("incr", Some(primary)), Role::Standby).join(" ");
        assert_eq!(
            a,
            "--stanza demo --output json --pg-host 10.0.0.7 --pg-port 5433 --backup-standby y --standby-data /pgdata \
             --standby-host /run/pg --standby-port 5432 backup --type incr"
        );
        // On the primary nothing is overridden: the config names it.
        let a = r.args(&req("full", None), Role::Primary).join(" ");
        assert_eq!(a, "--stanza demo --output json backup --type full");
        // Flags of the agent are passed on; a standby's replace theirs.
        let r = Runner { pg_flags: vec![("--pg-host".into(), "/controller/run".into()), ("--pg-port".into(), "5432".into())], ..runner() };
        let a = r.args(&req("full", Some(PrimaryAddress { host: "10.0.0.7".into(), port: 5433 })), Role::Standby).join(" ");
        assert!(a.contains("--pg-host 10.0.0.7 --pg-port 5433") && !a.contains("/controller/run"), "{a}");
        // A standby alone (CloudNativePG): no primary, a longer WAL wait.
        let r = Runner { standby_alone: Some(420), config_dir: Some("/etc/pgkeep-stanzas".into()), ..r }.for_stanza("pg");
        let a = r.args(&req("incr", None), Role::Standby).join(" ");
        assert_eq!(
            a,
            "--stanza pg --config /etc/pgkeep-stanzas/pg.toml --output json --pg-host /controller/run --pg-port 5432 \
             --backup-standby local --archive-timeout 420 backup --type incr"
        );
    }

    #[test]
    fn the_failure_line_is_the_engines_last_error_not_its_warnings() {
        let err = b"pgkeep: NOTICE: x\npgkeep: cannot connect to PostgreSQL at /tmp:5 as user postgres (check that the server runs)\npgkeep: WARNING: y\n";
        assert_eq!(failure_line(Some(1), err), "cannot connect to PostgreSQL at /tmp:5 as user postgres (check that the server runs)");
        assert_eq!(failure_line(None, b""), "the backup process was killed");
        assert_eq!(failure_line(Some(3), b"garbage"), "the backup process exited with status 3 without saying why");
    }

    #[test]
    fn a_result_needs_every_field() {
        let full = br#"{"label":"20260101-000000F","type":"full","start-time":"2026-01-01T00:00:00Z","stop-time":"2026-01-01T00:01:00Z",
            "start-lsn":"0/2000028","stop-lsn":"0/2000100","start-wal":"000000010000000000000002","stop-wal":"000000010000000000000002",
            "size":100,"repo-size":10,"expire-failed":null}"#;
        let r = parse_result(full).unwrap();
        assert_eq!((r.label.as_str(), r.size, r.warning), ("20260101-000000F", 100, None));
        assert!(parse_result(br#"{"label":"x"}"#).is_none());
    }

    #[tokio::test]
    async fn one_job_at_a_time_the_same_id_is_the_same_job_and_cancel_kills_it() {
        let jobs = Arc::new(Jobs::default());
        // `sh -c SCRIPT sh ...`: the backup's arguments become sh's
        // positional parameters. The script leaves a grandchild holding the
        // output pipes, as a helper process of the engine would, and says
        // when it has: cancel must kill it too (CI once saw the job stay
        // running when only sh was killed).
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("started");
        let script = format!("sleep 30 & touch '{}'; wait", mark.display());
        let r = Runner { exe: "/bin/sh".into(), global: vec!["-c".into(), script, "sh".into()], ..runner() };
        let a = BackupRequest { id: "a".into(), ..req("full", None) };
        assert_eq!(jobs.start(&r, a.clone(), Role::Primary).unwrap().state, JobState::Running);
        assert_eq!(jobs.start(&r, a.clone(), Role::Primary).unwrap().id, "a");
        let b = BackupRequest { id: "b".into(), ..a.clone() };
        assert!(matches!(jobs.start(&r, b, Role::Primary), Err(StartError::Busy(id)) if id == "a"));
        assert_eq!(jobs.running().as_deref(), Some("a"));
        assert!(matches!(jobs.start(&r, req("weekly", None), Role::Primary), Err(StartError::Invalid(_))));
        assert!(matches!(jobs.start(&r, req("full", None), Role::Standby), Err(StartError::Invalid(_))));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !mark.exists() {
            assert!(std::time::Instant::now() < deadline, "the test script did not start");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        jobs.cancel("a").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while jobs.get("a").unwrap().state == JobState::Running {
            assert!(std::time::Instant::now() < deadline, "the killed job still runs");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let done = jobs.get("a").unwrap();
        assert_eq!(done.state, JobState::Failed);
        assert!(done.error.unwrap().starts_with("cancelled"));
        assert!(jobs.cancel("nope").is_none());
    }
}
