//! The operator and the agents together, against a real Kubernetes API
//! server (scripts/kube-testenv) with real PostgreSQL servers: the test
//! plays the kubelet (it starts PostgreSQL and `pgkeep agent` for each Pod
//! as processes on this machine, each agent on its own 127.0.0.x, and marks
//! the Pod running with that podIP), and runs the operator in-process, as
//! its ServiceAccount (deploy/operator's RBAC), so that a test can stop it
//! in the middle of a flow and start it again.
//!
//! Mocked: nothing but the kubelet. Not covered here: `pods/exec` (no
//! kubelet can serve it).

#[path = "support/kube.rs"]
mod kube_env;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube_env::ControlPlane;
use serde_json::Value;
use support::*;

const NS: &str = "db";

/// The operator, run in its own runtime so that dropping it is a crash.
struct Operator {
    rt: Option<tokio::runtime::Runtime>,
}

impl Operator {
    fn start(kubeconfig: &Path) -> Operator {
        pgkeep_operator::run::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let kubeconfig = kubeconfig.to_owned();
        rt.spawn(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
            let client = kube::Client::try_from(config).unwrap();
            let settings = pgkeep_operator::context::Settings {
                agent_deadline: Duration::from_secs(8),
                pending_deadline: Duration::from_secs(120),
                poll: Duration::from_secs(1),
                stanza_refresh: Duration::from_secs(2),
            };
            if let Err(e) = pgkeep_operator::run::run(client, settings, Some(NS.into()), None, None).await {
                eprintln!("operator: {e}");
            }
        });
        Operator { rt: Some(rt) }
    }

    /// Stops it as a crash would: every task dropped where it stands.
    fn kill(mut self) {
        self.rt.take().unwrap().shutdown_background();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One "pod": a PostgreSQL server and its agent.
struct PodProcs {
    name: String,
    ip: String,
    pk: Pgkeep,
    agent: Option<Background>,
}

/// The world of one test: the control plane, a test dir, a repository, the
/// operator's kubeconfig, the agents' port and token file.
struct World {
    cp: ControlPlane,
    dir: TestDir,
    repo: Repo,
    op_kubeconfig: PathBuf,
    agent_port: u16,
    token_file: PathBuf,
}

impl World {
    fn new(name: &str) -> World {
        let cp = ControlPlane::start();
        cp.install_operator_rbac_and_crds();
        cp.kubectl(&["create", "namespace", NS]);
        let op_kubeconfig = cp.kubeconfig_for("pgkeep-system", "pgkeep-operator");
        let dir = TestDir::new(name);
        let repo = Repo::local(&dir, "repo");
        let token_file = dir.join("agent-token");
        World { cp, dir, repo, op_kubeconfig, agent_port: free_port(), token_file }
    }

    /// A world with one pod, `pg-0`, the primary at `ip` (pgbench
    /// initialised), its Stanza and a running operator.
    fn one_primary(name: &str, ip: &str) -> (World, Cluster, PodProcs, Operator) {
        let w = World::new(name);
        let (primary, mut p0) = w.primary(ip);
        primary.pgbench_init(1);
        w.stanza(&primary);
        let op = Operator::start(&w.op_kubeconfig);
        w.token();
        w.cp.apply(&statefulset(1));
        w.run_pod(&mut p0);
        (w, primary, p0, op)
    }

    /// The primary: archiving into the stanza `main` (which the operator
    /// creates in the repository through its agent), listening on TCP at
    /// `ip` too (a backup on a standby reaches it there).
    fn primary(&self, ip: &str) -> (Cluster, PodProcs) {
        let pk = Pgkeep::new(&self.dir, "pg-0", "main");
        let c = Cluster::new(&self.dir, "pg0", Some(&pk));
        pk.write_raw_config(&format!("archive-timeout = 120\n{}", pk.config_text(&c.addr, &self.repo)));
        c.psql(&format!("alter system set listen_addresses = '{ip}'"));
        let hba = c.addr.data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str("host all all 127.0.0.0/8 trust\nhost replication all 127.0.0.0/8 trust\n");
        std::fs::write(&hba, text).unwrap();
        c.stop_clean();
        c.start();
        (c, PodProcs { name: "pg-0".into(), ip: ip.into(), pk, agent: None })
    }

    /// A streaming standby of `primary`, its agent's config on itself.
    fn standby(&self, primary: &Cluster, name: &str, ip: &str) -> (Cluster, PodProcs) {
        let c = Cluster::standby_of(&self.dir, &name.replace('-', ""), primary);
        let pk = Pgkeep::new(&self.dir, name, "main");
        pk.write_raw_config(&format!("archive-timeout = 120\n{}", pk.config_text(&c.addr, &self.repo)));
        (c, PodProcs { name: name.into(), ip: ip.into(), pk, agent: None })
    }

    /// The Stanza `main` over pods labelled app=postgres.
    fn stanza(&self, primary: &Cluster) {
        self.cp.apply(&format!(
            "apiVersion: pgkeep.dev/v1alpha1\nkind: Stanza\nmetadata: {{name: main, namespace: {NS}}}\n\
             spec:\n  selector: {{matchLabels: {{app: postgres}}}}\n  pgPort: {}\n  agent: {{port: {}}}\n  \
             repositories: [{{destinationPath: \"{}\"}}]\n",
            primary.addr.port,
            self.agent_port,
            self.repo.path().display()
        ));
    }

    /// Waits for the operator's token Secret and writes the token where
    /// the agents read it (a pod mounts the Secret).
    fn token(&self) {
        let secret = self
            .cp
            .wait_for(NS, "secret", "main-agent", Duration::from_secs(60), "made", |s| s["data"]["token"].as_str().map(str::to_owned));
        let token = String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &secret).unwrap()).unwrap();
        std::fs::write(&self.token_file, token).unwrap();
        std::process::Command::new("chown").arg("postgres").arg(&self.token_file).status().unwrap();
    }

    /// Plays the kubelet for `pod`: starts its agent, waits until it
    /// answers, marks the Pod running with its IP.
    fn run_pod(&self, pod: &mut PodProcs) {
        let listen = format!("{}:{}", pod.ip, self.agent_port);
        pod.agent = Some(pod.pk.spawn(&["agent", "--listen", &listen, "--token-file", self.token_file.to_str().unwrap()]));
        wait_until(Duration::from_secs(30), &format!("agent of {} answers", pod.name), || std::net::TcpStream::connect(&listen).is_ok());
        self.cp.mark_running(NS, &pod.name, &pod.ip);
    }

    fn backup(&self, name: &str, spec: &str) {
        self.cp.apply(&format!(
            "apiVersion: pgkeep.dev/v1alpha1\nkind: Backup\nmetadata: {{name: {name}, namespace: {NS}}}\nspec: {{stanza: main, {spec}}}\n"
        ));
    }

    /// Waits until Backup `name` is in a final phase; returns its status.
    fn finished(&self, name: &str, timeout: Duration) -> Value {
        self.cp.wait_for(NS, "backup", name, timeout, "finished", |b| {
            let phase = b["status"]["phase"].as_str()?;
            (phase == "completed" || phase == "failed").then(|| b["status"].clone())
        })
    }

    fn running(&self, name: &str) -> Value {
        self.cp.wait_for(NS, "backup", name, Duration::from_secs(60), "running", |b| {
            (b["status"]["phase"] == "running").then(|| b["status"].clone())
        })
    }
}

fn wait_until(timeout: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "not true after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills an agent and the backup processes it started, as the death of
/// its container does.
fn kill_agent(pod: &mut PodProcs) {
    let agent = pod.agent.take().expect("the agent runs");
    let _ = std::process::Command::new("pkill").args(["-KILL", "-P", &agent.pid().to_string()]).status();
    drop(agent);
}

/// Backup processes (`pgkeep ... backup`) running on this machine for the
/// test dir.
fn backup_processes(dir: &TestDir) -> usize {
    let out =
        std::process::Command::new("pgrep").args(["-f", &format!("{} .*backup --type", dir.pgkeep_bin().display())]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Stops WAL archiving (archive_command fails): a backup then waits at
/// its end for its last segment to reach the archive.
fn stall_archiving(c: &Cluster) {
    c.psql("alter system set archive_command = 'false'");
    c.psql("select pg_reload_conf()");
}

fn resume_archiving(c: &Cluster) {
    c.psql("alter system reset archive_command");
    c.psql("select pg_reload_conf()");
}

fn labels_in_repo(pk: &Pgkeep) -> Vec<String> {
    let v: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    v[0]["backups"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap().to_owned()).collect()
}

fn statefulset(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: pg, namespace: {NS}}}\nspec:\n  serviceName: pg\n  replicas: {replicas}\n  \
         selector: {{matchLabels: {{app: postgres}}}}\n  template:\n    metadata: {{labels: {{app: postgres}}}}\n    spec:\n      \
         containers: [{{name: postgres, image: postgres:17}}, {{name: pgkeep-agent, image: ghcr.io/pgkeep/pgkeep:0.1.0}}]\n"
    )
}

#[test]
fn kube_a_backup_runs_on_the_most_recent_standby_and_restores_identical() {
    let w = World::new("kube-standby");
    let (primary, mut p0) = w.primary("127.0.0.2");
    primary.pgbench_init(2);
    let (standby, mut p1) = w.standby(&primary, "pg-1", "127.0.0.3");
    w.stanza(&primary);
    let op = Operator::start(&w.op_kubeconfig);
    w.token();
    // The StatefulSet makes pg-0; pg-1 once pg-0 is ready.
    w.cp.apply(&statefulset(2));
    w.run_pod(&mut p0);
    w.run_pod(&mut p1);

    // prefer-standby (the default): the streaming standby.
    primary.pgbench(3, 2);
    w.backup("first", "type: full");
    let s = w.finished("first", Duration::from_secs(300));
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!((s["pod"].as_str(), s["role"].as_str(), s["type"].as_str()), (Some("pg-1"), Some("standby"), Some("full")), "{s}");
    let first = s["label"].as_str().unwrap().to_owned();
    assert!(s["size"].as_u64().unwrap() > 0 && s["repoSize"].as_u64().unwrap() > 0, "{s}");
    for k in ["beginLsn", "endLsn", "beginWal", "endWal", "startedAt", "stoppedAt"] {
        assert!(s[k].is_string(), "{k} missing: {s}");
    }
    assert!(labels_in_repo(&p0.pk).contains(&first));
    let reasons = w.cp.event_reasons(NS, "first");
    assert!(reasons.contains(&"Started".into()) && reasons.contains(&"Completed".into()), "{reasons:?}");

    // target: primary. An incremental there cannot build on a backup of
    // the standby's files (another data directory): the engine takes a full
    // one and says why, in the event.
    primary.pgbench(3, 2);
    w.backup("second", "type: incr, target: primary");
    let s = w.finished("second", Duration::from_secs(300));
    assert_eq!((s["phase"].as_str(), s["pod"].as_str(), s["role"].as_str()), (Some("completed"), Some("pg-0"), Some("primary")), "{s}");
    assert_eq!(s["type"], "full", "{s}");
    // The next incremental on the primary builds on it.
    primary.pgbench(3, 2);
    w.backup("third", "type: incr, target: primary");
    let s = w.finished("third", Duration::from_secs(300));
    assert_eq!((s["phase"].as_str(), s["type"].as_str()), (Some("completed"), Some("incr")), "{s}");
    let (second, third) = (
        w.cp.get(NS, "backup", "second").unwrap()["status"]["label"].as_str().unwrap().to_owned(),
        s["label"].as_str().unwrap().to_owned(),
    );

    // The Stanza's status: the backups, the recovery window, archiving.
    let st = w.cp.wait_for(NS, "stanza", "main", Duration::from_secs(60), "showing the three backups", |s| {
        (s["status"]["backups"].as_array()?.len() == 3).then(|| s["status"].clone())
    });
    assert_eq!(st["backups"][0]["label"], first.as_str());
    assert_eq!(st["backups"][1]["label"], second.as_str());
    assert_eq!((st["backups"][2]["label"].as_str(), st["backups"][2]["prior"].as_str()), (Some(third.as_str()), Some(second.as_str())));
    assert_eq!(st["firstRecoverabilityPoint"], st["backups"][0]["stopTime"]);
    assert_eq!(st["lastSuccessfulBackup"], st["backups"][2]["stopTime"]);
    assert!(st["archive"]["lastArchivedWal"].is_string(), "{st}");
    assert_eq!(st["systemId"], primary.system_id().as_str());
    // The operator created the stanza in the repository, once.
    assert_eq!(st["createdForSystem"], primary.system_id().as_str());
    assert_eq!(w.cp.event_reasons(NS, "main").iter().filter(|r| *r == "Created").count(), 1);
    assert!(st["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Ready" && c["status"] == "True"), "{st}");

    // Both restore what the primary holds (to the end of the archive).
    primary.pgbench(2, 2);
    let segment = primary.switch_wal();
    primary.wait_archived(&segment);
    let expected = primary.dump();
    for label in [&first, &third] {
        let target = w.dir.join(&format!("restore-{label}"));
        p0.pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", label]);
        let restored = Cluster::start_restored(&w.dir, &target);
        assert_same_dump(&format!("restore of {label}"), &expected, &restored.dump());
        restored.amcheck();
        assert_eq!(restored.visibility_findings(), "0", "pg_check_visible/pg_check_frozen findings in the restore of {label}");
    }
    // The agents' metrics.
    let metrics = http_get(&format!("{}:{}", p1.ip, w.agent_port), "/metrics");
    assert!(metrics.contains("pgkeep_backups{stanza=\"main\"} 3"), "{metrics}");
    assert!(metrics.contains("pgkeep_agent_backup_last_success_seconds{stanza=\"main\"}"), "{metrics}");
    assert!(metrics.contains("pgkeep_pg_primary{stanza=\"main\"} 0"), "{metrics}");
    drop(standby);
    op.kill();
}

/// A plain HTTP GET on loopback (the agents' /metrics needs no token).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn kube_a_dead_agent_fails_its_backup_in_time_and_an_operator_crash_loses_and_duplicates_nothing() {
    let (w, primary, mut p0, op) = World::one_primary("kube-faults", "127.0.0.4");

    // The agent (and the backup it runs) dies with its container: failed
    // within the agent deadline (8 s here), with the reason.
    stall_archiving(&primary);
    w.backup("killed", "type: full");
    w.running("killed");
    let t0 = Instant::now();
    kill_agent(&mut p0);
    let s = w.finished("killed", Duration::from_secs(60));
    assert_eq!(s["phase"], "failed");
    assert!(s["error"].as_str().unwrap().contains("has not answered for"), "{s}");
    assert!(t0.elapsed() < Duration::from_secs(40), "failed only after {:?}", t0.elapsed());
    assert!(w.cp.event_reasons(NS, "killed").contains(&"Failed".into()));

    // The container restarts mid-backup: the new agent does not know the
    // job, and the Backup fails at once saying so.
    w.run_pod(&mut p0);
    w.backup("restarted", "type: full");
    w.running("restarted");
    kill_agent(&mut p0);
    w.run_pod(&mut p0);
    let s = w.finished("restarted", Duration::from_secs(60));
    assert_eq!(s["phase"], "failed");
    assert!(s["error"].as_str().unwrap().contains("no longer knows this backup"), "{s}");

    // Deleted while running: the job is cancelled (its process killed),
    // and the Backup goes away.
    w.backup("deleted", "type: full");
    w.running("deleted");
    assert_eq!(backup_processes(&w.dir), 1);
    w.cp.kubectl(&["-n", NS, "delete", "backup", "deleted", "--timeout=60s"]);
    wait_until(Duration::from_secs(30), "the cancelled backup's process is gone", || backup_processes(&w.dir) == 0);

    // The operator crashes while a backup runs, and the backup completes
    // while it is down: once back, it records that one job; nothing runs
    // twice, nothing is lost.
    let before = labels_in_repo(&p0.pk).len();
    w.backup("crash", "type: full");
    w.running("crash");
    op.kill();
    resume_archiving(&primary);
    wait_until(Duration::from_secs(120), "the backup completes while the operator is down", || backup_processes(&w.dir) == 0);
    let op = Operator::start(&w.op_kubeconfig);
    let s = w.finished("crash", Duration::from_secs(60));
    assert_eq!(s["phase"], "completed", "{s}");
    let labels = labels_in_repo(&p0.pk);
    assert_eq!(labels.len(), before + 1, "{labels:?}");
    assert_eq!(labels.last().map(String::as_str), s["label"].as_str());
    // The unfinished backups of the killed runs did not make it into the
    // repository's list, and the next backup takes over their lock.
    w.backup("after", "type: incr");
    let s = w.finished("after", Duration::from_secs(120));
    assert_eq!(s["phase"], "completed", "{s}");
    // A pending Backup survives a crash too: made while the operator is
    // down, it runs once it is back.
    op.kill();
    w.backup("while-down", "type: incr");
    std::thread::sleep(Duration::from_secs(2));
    let _op = Operator::start(&w.op_kubeconfig);
    assert_eq!(w.finished("while-down", Duration::from_secs(120))["phase"], "completed");
    assert_eq!(labels_in_repo(&p0.pk).len(), before + 3);

    // Deleting a completed Backup leaves its data to retention...
    let kept = w.cp.get(NS, "backup", "after").unwrap()["status"]["label"].as_str().unwrap().to_owned();
    w.cp.kubectl(&["-n", NS, "delete", "backup", "after", "--timeout=60s"]);
    assert!(labels_in_repo(&p0.pk).contains(&kept));
    // ...unless deleteFromRepository says otherwise; and when later backups
    // depend on it, the data stays, an event says why, and the Backup goes.
    w.backup("base", "type: full, deleteFromRepository: true");
    let base = w.finished("base", Duration::from_secs(120))["label"].as_str().unwrap().to_owned();
    w.backup("child", "type: incr, deleteFromRepository: true");
    let child = w.finished("child", Duration::from_secs(120))["label"].as_str().unwrap().to_owned();
    w.cp.kubectl(&["-n", NS, "delete", "backup", "base", "--timeout=60s"]);
    assert!(labels_in_repo(&p0.pk).contains(&base));
    w.cp.kubectl(&["-n", NS, "delete", "backup", "child", "--timeout=60s"]);
    let labels = labels_in_repo(&p0.pk);
    assert!(!labels.contains(&child) && labels.contains(&base), "{labels:?}");
    let kept_events = w.cp.kubectl(&["-n", NS, "get", "events.events.k8s.io", "-o", "json"]);
    assert!(kept_events.contains("Kept") && kept_events.contains(&format!("backup {base} stays in the repository")), "no Kept event");
}

#[test]
fn kube_scheduled_backups_tick_skip_while_one_runs_suspend_and_catch_up_once() {
    let (w, primary, p0, op) = World::one_primary("kube-schedule", "127.0.0.5");

    let sched = |suspend: bool| {
        format!(
            "apiVersion: pgkeep.dev/v1alpha1\nkind: ScheduledBackup\nmetadata: {{name: every5, namespace: {NS}}}\n\
             spec: {{stanza: main, schedule: '*/5 * * * * *', type: incr, immediate: true, suspend: {suspend}}}\n"
        )
    };
    w.cp.apply(&sched(false));
    let ours = |w: &World| -> Vec<Value> {
        let mut v: Vec<Value> =
            w.cp.list(NS, "backups").into_iter().filter(|b| b["metadata"]["labels"]["pgkeep.dev/scheduled-backup"] == "every5").collect();
        v.sort_by_key(|b| b["metadata"]["name"].as_str().unwrap().to_owned());
        v
    };
    // Backups are made (the first at once: immediate), owned by the
    // ScheduledBackup, and complete.
    wait_until(Duration::from_secs(120), "three scheduled backups completed", || {
        ours(&w).iter().filter(|b| b["status"]["phase"] == "completed").count() >= 3
    });
    let made = ours(&w);
    assert_eq!(made[0]["metadata"]["ownerReferences"][0]["kind"], "ScheduledBackup");
    let sb = w.cp.get(NS, "scheduledbackup", "every5").unwrap();
    assert!(sb["status"]["lastScheduleTime"].is_string() && sb["status"]["nextScheduleTime"].is_string(), "{sb}");

    // A backup that runs long: the ticks meanwhile are skipped, with an
    // event, and never two backups of the stanza run at once.
    stall_archiving(&primary);
    w.cp.wait_for(NS, "scheduledbackup", "every5", Duration::from_secs(60), "skipping a tick", |s| {
        s["status"]["lastSkippedTime"].as_str().map(str::to_owned)
    });
    assert!(w.cp.event_reasons(NS, "every5").contains(&"Skipped".into()));
    let running = ours(&w).iter().filter(|b| b["status"]["phase"] != "completed" && b["status"]["phase"] != "failed").count();
    assert!(running <= 1, "{running} scheduled backups unfinished at once");
    resume_archiving(&primary);

    // Suspended: no new Backup.
    w.cp.apply(&sched(true));
    wait_until(Duration::from_secs(120), "no unfinished scheduled backup", || {
        ours(&w).iter().all(|b| b["status"]["phase"] == "completed" || b["status"]["phase"] == "failed")
    });
    let count = ours(&w).len();
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(ours(&w).len(), count, "backups made while suspended");
    let last = w.cp.get(NS, "scheduledbackup", "every5").unwrap()["status"]["lastScheduleTime"].as_str().unwrap().to_owned();

    // Resumed while the operator is down: once back, one backup for the
    // latest missed tick, not one per missed tick.
    op.kill();
    w.cp.apply(&sched(false));
    std::thread::sleep(Duration::from_secs(11));
    let back = chrono::Utc::now();
    let _op = Operator::start(&w.op_kubeconfig);
    wait_until(Duration::from_secs(60), "a catch-up backup", || ours(&w).len() > count);
    let names: Vec<String> = ours(&w).iter().map(|b| b["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    let tick_of = |name: &str| chrono::NaiveDateTime::parse_from_str(name.trim_start_matches("every5-"), "%Y%m%d%H%M%S").unwrap().and_utc();
    let last = chrono::DateTime::parse_from_rfc3339(&last).unwrap();
    let after: Vec<_> = names.iter().map(|n| tick_of(n)).filter(|t| *t > last).collect();
    // The first tick after the suspension is the catch-up: the latest one
    // before the operator came back, and none between.
    assert!(after[0] <= back && back - after[0] < chrono::Duration::seconds(6), "catch-up tick {} vs restart {back}", after[0]);
    // Deleting the ScheduledBackup deletes its Backups (owner references,
    // the garbage collector), not their data.
    let in_repo = labels_in_repo(&p0.pk).len();
    w.cp.kubectl(&["-n", NS, "delete", "scheduledbackup", "every5", "--timeout=60s"]);
    wait_until(Duration::from_secs(60), "the scheduled Backups are collected", || ours(&w).is_empty());
    assert!(labels_in_repo(&p0.pk).len() >= in_repo);
}
