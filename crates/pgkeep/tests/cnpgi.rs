//! CloudNativePG's plugin interface (CNPG-I), instance side: every RPC of
//! `pgkeep agent --plugin-socket` over the real Unix socket, with a tonic
//! client generated from the same protos, against real PostgreSQL.
//!
//! CloudNativePG's instance manager is what calls these services in a pod
//! (PostgreSQL's `archive_command` and `restore_command` are `manager
//! wal-archive` / `manager wal-restore`). It cannot run here (it needs its
//! pod and its local web server), so PostgreSQL runs
//! `pgkeep-cnpgi-client` instead, which makes the same calls with the same
//! rules: `check_empty_wal_archive` while `.check-empty-wal-archive`
//! exists in PGDATA, and exit status 1 for every failure. The Cluster and
//! Backup objects are JSON shaped like CloudNativePG 1.27-1.30's.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgkeep_cnpgi::proto::backup::backup_client::BackupClient;
use pgkeep_cnpgi::proto::backup::{BackupCapabilitiesRequest, BackupRequest, BackupResult};
use pgkeep_cnpgi::proto::identity::identity_client::IdentityClient;
use pgkeep_cnpgi::proto::identity::{GetPluginCapabilitiesRequest, GetPluginMetadataRequest, ProbeRequest};
use pgkeep_cnpgi::proto::metrics::metrics_client::MetricsClient;
use pgkeep_cnpgi::proto::metrics::{CollectMetricsRequest, DefineMetricsRequest, MetricsCapabilitiesRequest};
use pgkeep_cnpgi::proto::wal::restore_job_hooks_client::RestoreJobHooksClient;
use pgkeep_cnpgi::proto::wal::wal_client::WalClient;
use pgkeep_cnpgi::proto::wal::wal_restore_request::Mode;
use pgkeep_cnpgi::proto::wal::{
    RestoreJobHooksCapabilitiesRequest, RestoreRequest, SetFirstRequiredRequest, WalArchiveRequest, WalCapabilitiesRequest,
    WalRestoreRequest, WalStatusRequest,
};
use serde_json::json;
use support::*;
use tonic::transport::Channel;
use tonic::Code;

/// `pgkeep agent --plugin-socket` as postgres, its stderr in `dir/<name>.log`;
/// killed on drop.
struct PluginAgent {
    _child: Background,
    socket: PathBuf,
    log: PathBuf,
}

impl PluginAgent {
    /// Starts it with config `pk`, recovery `restore_command` calling the
    /// client with `cluster_json`, and waits for its socket.
    fn start(dir: &TestDir, pk: &Pgkeep, name: &str, cluster_json: &Path, extra: &[&str]) -> PluginAgent {
        let socket = dir.join(&format!("{name}.sock"));
        let restore_command = format!("{} wal-restore %f %p", client_command(dir, &socket, cluster_json));
        PluginAgent::start_at(dir, pk, name, socket, &restore_command, extra)
    }

    /// Starts it on `socket` with `restore_command` for recoveries.
    fn start_at(dir: &TestDir, pk: &Pgkeep, name: &str, socket: PathBuf, restore_command: &str, extra: &[&str]) -> PluginAgent {
        let log = dir.join(&format!("{name}.log"));
        let mut c = as_postgres(dir.pgkeep_bin(), dir.path());
        c.arg("--config").arg(&pk.config).arg("agent").arg("--plugin-socket").arg(&socket);
        c.arg("--plugin-restore-command").arg(restore_command).args(extra);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let child = c.spawn().expect("start the agent");
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(20), "the agent did not create {}:\n{}", socket.display(), tail(&log, 20));
            std::thread::sleep(Duration::from_millis(50));
        }
        PluginAgent { _child: Background::from_child(child, "pgkeep agent"), socket, log }
    }

    async fn channel(&self) -> Channel {
        pgkeep_cnpgi::connect_unix(&self.socket).await.expect("connect to the plugin socket")
    }
}

/// The client, copied where postgres can run it.
fn client_bin(dir: &TestDir) -> PathBuf {
    let bin = dir.join("pgkeep-cnpgi-client");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_pgkeep-cnpgi-client"), &bin).unwrap();
    }
    bin
}

/// `pgkeep-cnpgi-client --socket S --cluster F` (PostgreSQL runs it in
/// its data directory, as it runs the instance manager).
fn client_command(dir: &TestDir, socket: &Path, cluster_json: &Path) -> String {
    format!("{} --socket {} --cluster {}", client_bin(dir).display(), socket.display(), cluster_json.display())
}

/// Writes `value` as `dir/name.json`, readable by postgres.
fn write_json(dir: &TestDir, name: &str, value: &serde_json::Value) -> PathBuf {
    let p = dir.join(&format!("{name}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    p
}

/// A running Cluster of CloudNativePG, with pgkeep as its WAL archiver
/// for stanza `stanza` (as `kubectl get cluster -o json` shows it).
fn cluster_json(name: &str, stanza: &str, archiver: bool, primary: &str) -> serde_json::Value {
    json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": name, "namespace": "default", "uid": "6f1c9a0e-0000-4000-8000-000000000001", "generation": 1},
        "spec": {
            "instances": 1,
            "imageName": "ghcr.io/cloudnative-pg/postgresql:15",
            "storage": {"size": "1Gi"},
            "plugins": [{"name": "pgkeep.dev", "enabled": true, "isWALArchiver": archiver, "parameters": {"stanza": stanza}}],
            "postgresql": {"parameters": {"archive_timeout": "5min"}}
        },
        "status": {"currentPrimary": primary, "targetPrimary": primary, "phase": "Cluster in healthy state", "timelineID": 1}
    })
}

/// A Cluster bootstrapping from `source_stanza` (external cluster
/// `origin`) with `target` as its `recoveryTarget`, archiving into
/// `own_stanza` once running.
fn recovery_cluster_json(source_stanza: &str, own_stanza: &str, target: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "restored", "namespace": "default", "uid": "6f1c9a0e-0000-4000-8000-000000000002"},
        "spec": {
            "instances": 1,
            "storage": {"size": "1Gi"},
            "plugins": [{"name": "pgkeep.dev", "isWALArchiver": true, "parameters": {"stanza": own_stanza}}],
            "bootstrap": {"recovery": {"source": "origin", "recoveryTarget": target}},
            "externalClusters": [{"name": "origin", "plugin": {"name": "pgkeep.dev", "parameters": {"stanza": source_stanza}}}]
        },
        "status": {"phase": "Setting up primary", "currentPrimary": "", "targetPrimary": "restored-1"}
    })
}

/// A CloudNativePG Backup of `cluster` with `method: plugin`.
fn backup_json(name: &str, kind: &str) -> serde_json::Value {
    json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Backup",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"cluster": {"name": "pg"}, "method": "plugin", "target": "primary",
                 "pluginConfiguration": {"name": "pgkeep.dev", "parameters": {"type": kind}}}
    })
}

/// `initdb` a cluster whose `archive_command` goes through the plugin, with
/// CloudNativePG's `.check-empty-wal-archive` marker; not started.
fn cnpg_cluster(dir: &TestDir, name: &str, socket: &Path, cluster_json: &Path) -> Cluster {
    let c = Cluster::initdb(dir, name, None, &["-k"], &pg_bin());
    let archive = format!("{} wal-archive %p", client_command(dir, socket, cluster_json));
    let conf = format!("archive_mode = on\narchive_command = '{archive}'\n");
    let path = c.addr.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&conf);
    std::fs::write(&path, text).unwrap();
    let marker = c.addr.data.join(".check-empty-wal-archive");
    std::fs::write(&marker, b"").unwrap();
    run_ok(Command::new("chown").arg("postgres:postgres").arg(&marker), Duration::from_secs(10));
    c
}

/// A Backup through `agent`'s plugin (`backup_json(name, kind)`, the
/// `type` also given as the call's parameters), failing the test with the
/// agent's log.
fn take_backup(rt: &tokio::runtime::Runtime, agent: &PluginAgent, cluster: &[u8], name: &str, kind: &str) -> BackupResult {
    rt.block_on(async {
        BackupClient::new(agent.channel().await)
            .backup(BackupRequest {
                cluster_definition: cluster.to_vec(),
                backup_definition: serde_json::to_vec(&backup_json(name, kind)).unwrap(),
                parameters: [("type".to_owned(), kind.to_owned())].into(),
            })
            .await
            .unwrap_or_else(|s| panic!("{kind} backup {name}: {s:?}\n{}", tail(&agent.log, 20)))
            .into_inner()
    })
}

/// A cluster archiving through the plugin as CloudNativePG's would
/// (`cnpg_cluster`), with Cluster `json`, stanza `pg` in a local
/// repository, and its agent (with `extra` arguments), started. Bind it as
/// `let (dir, repo, pk, json_path, pg, agent) = ...`: the bindings drop in
/// reverse, the agent first and the directory last.
fn plugin_cluster(name: &str, json: &serde_json::Value, extra: &[&str]) -> (TestDir, Repo, Pgkeep, PathBuf, Cluster, PluginAgent) {
    let dir = TestDir::new(name);
    let repo = Repo::local(&dir, "repo");
    let pk = Pgkeep::new(&dir, "plugin", "pg");
    let json_path = write_json(&dir, "cluster", json);
    let pg = cnpg_cluster(&dir, "pg-data", &dir.join("agent.sock"), &json_path);
    pk.write_config(&pg.addr, &repo);
    let agent = PluginAgent::start(&dir, &pk, "agent", &json_path, extra);
    pg.start();
    (dir, repo, pk, json_path, pg, agent)
}

/// An Archive call of the file at `path`.
fn archive_req(cluster: Vec<u8>, path: String, check_empty: Option<bool>) -> WalArchiveRequest {
    WalArchiveRequest {
        cluster_definition: cluster,
        source_file_name: path,
        parameters: Default::default(),
        check_empty_wal_archive: check_empty,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Identity, WAL (Archive, Restore in both modes, Status,
/// SetFirstRequired, the empty-archive check), Backup (full and incr) and
/// Metrics of one running cluster.
#[test]
fn every_instance_rpc_over_the_socket_against_a_real_cluster() {
    let (dir, repo, pk, json_path, pg, agent) = plugin_cluster("cnpgi", &cluster_json("pg", "pg", true, "pg-1"), &[]);
    let data = pg.addr.data.clone();
    let rt = rt();
    let cluster = serde_json::to_vec(&cluster_json("pg", "pg", true, "pg-1")).unwrap();

    rt.block_on(async {
        let ch = agent.channel().await;
        let mut id = IdentityClient::new(ch.clone());
        let meta = id.get_plugin_metadata(GetPluginMetadataRequest {}).await.unwrap().into_inner();
        assert_eq!((meta.name.as_str(), meta.license.as_str()), ("pgkeep.dev", "Apache-2.0"));
        let caps = id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(caps.capabilities.len(), 4, "WAL, Backup, RestoreJob, Metrics: {caps:?}");
        assert!(id.probe(ProbeRequest {}).await.unwrap().into_inner().ready);
        let wal_caps = WalClient::new(ch.clone()).get_capabilities(WalCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(wal_caps.capabilities.len(), 4);
        let backup_caps = BackupClient::new(ch.clone()).get_capabilities(BackupCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(backup_caps.capabilities.len(), 1);
        let job_caps =
            RestoreJobHooksClient::new(ch.clone()).get_capabilities(RestoreJobHooksCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(job_caps.capabilities.len(), 1);
        let metrics_caps = MetricsClient::new(ch.clone()).get_capabilities(MetricsCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(metrics_caps.capabilities.len(), 1);
    });

    // The first archived file creates the stanza (CloudNativePG asks for
    // the empty-archive check until then) and removes the marker.
    pg.pgbench_init(2);
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);
    assert!(!data.join(".check-empty-wal-archive").exists(), "the plugin removes CloudNativePG's marker after the first archived file");
    assert!(repo.path().join("pg").is_dir(), "the stanza was created by the first archived file");
    // Copies of the segments PostgreSQL archived, before a checkpoint
    // recycles them.
    let mut archived: Vec<(String, Vec<u8>)> = std::fs::read_dir(data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".done")).map(str::to_owned))
        .filter(|n| n.len() == 24)
        .map(|n| {
            let bytes = std::fs::read(data.join("pg_wal").join(&n)).unwrap();
            (n, bytes)
        })
        .collect();
    archived.sort();
    assert!(!archived.is_empty());

    rt.block_on(async {
        let ch = agent.channel().await;
        let mut wal = WalClient::new(ch.clone());
        // Restore of each archived segment: byte-identical, in both modes.
        let out = dir.mkdir("restored-wal");
        for (i, (name, bytes)) in archived.iter().enumerate() {
            let mode = if i % 2 == 0 { Mode::Recovery } else { Mode::Rewind };
            let dest = out.join(name);
            wal.restore(WalRestoreRequest {
                cluster_definition: cluster.clone(),
                source_wal_name: name.clone(),
                destination_file_name: dest.display().to_string(),
                parameters: Default::default(),
                mode: mode as i32,
            })
            .await
            .unwrap_or_else(|s| panic!("restore {name}: {s:?}"));
            assert!(std::fs::read(&dest).unwrap() == *bytes, "{name} restored in {mode:?} mode differs from what PostgreSQL archived");
        }
        // Not in the archive: NOT_FOUND, at once.
        let missing = wal
            .restore(WalRestoreRequest {
                cluster_definition: cluster.clone(),
                source_wal_name: "0000000100000000000000F0".into(),
                destination_file_name: out.join("x").display().to_string(),
                parameters: Default::default(),
                mode: Mode::Recovery as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

        let status = wal.status(WalStatusRequest { cluster_definition: cluster.clone() }).await.unwrap().into_inner();
        assert_eq!(status.first_wal, archived[0].0, "{status:?}");
        assert!(status.last_wal >= seg, "{status:?}");
        assert_eq!(status.additional_information.get("stanza").map(String::as_str), Some("pg"));

        // A new cluster (an agent that has not checked this archive) asking
        // for an empty archive is refused: this one holds WAL and more.
        let (first, _) = &archived[0];
        let copy = dir.join(first);
        std::fs::write(&copy, &archived[0].1).unwrap();
        let fresh = PluginAgent::start(&dir, &pk, "fresh", &json_path, &[]);
        let refused = WalClient::new(fresh.channel().await)
            .archive(archive_req(cluster.clone(), copy.display().to_string(), Some(true)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("expected an empty WAL archive"), "{}", refused.message());
        drop(fresh);
        // The agent that made the check once does not make it again (the
        // instance manager asks until it removes its marker, later).
        wal.archive(archive_req(cluster.clone(), copy.display().to_string(), Some(true))).await.unwrap();
        // A relative path is refused (CloudNativePG sends absolute ones).
        let e = wal.archive(archive_req(cluster.clone(), format!("pg_wal/{first}"), Some(false))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        // Not the WAL source of a running cluster: not found, at once,
        // so that CloudNativePG asks the next plugin.
        let t = Instant::now();
        let e = wal
            .restore(WalRestoreRequest {
                cluster_definition: serde_json::to_vec(&cluster_json("pg", "pg", false, "pg-1")).unwrap(),
                source_wal_name: first.clone(),
                destination_file_name: out.join("not-ours").display().to_string(),
                parameters: Default::default(),
                mode: Mode::Recovery as i32,
            })
            .await
            .unwrap_err();
        assert!(e.code() == Code::NotFound && t.elapsed() < Duration::from_secs(5), "{e:?}");
        // Without the check, the same file again is accepted (same content).
        wal.archive(archive_req(cluster.clone(), copy.display().to_string(), Some(false))).await.unwrap();
        // isWALArchiver: false: CloudNativePG still calls; nothing is stored.
        let not_archiver = serde_json::to_vec(&cluster_json("pg", "nowhere", false, "pg-1")).unwrap();
        wal.archive(archive_req(not_archiver, copy.display().to_string(), Some(true))).await.unwrap();
        wal.set_first_required(SetFirstRequiredRequest { cluster_definition: cluster.clone(), first_required_wal: seg.clone() })
            .await
            .unwrap();
        let bad = wal
            .set_first_required(SetFirstRequiredRequest { cluster_definition: cluster.clone(), first_required_wal: "nope".into() })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        // A Cluster without our stanza parameter: the field path says where.
        let no_stanza = serde_json::to_vec(&json!({"spec": {"plugins": [{"name": "pgkeep.dev", "isWALArchiver": true}]}})).unwrap();
        let e = wal.status(WalStatusRequest { cluster_definition: no_stanza }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("spec.plugins[0].parameters.stanza: is required"), "{}", e.message());
    });

    // Backups: a full, writes, an incremental, each returned with what
    // CloudNativePG records.
    let labels: Vec<String> = ["full", "incr"]
        .iter()
        .map(|kind| {
            pg.pgbench(3, 2);
            let r = take_backup(&rt, &agent, &cluster, &format!("b-{kind}"), kind);
            assert!(r.online && r.started_at > 0 && r.stopped_at >= r.started_at, "{r:?}");
            assert!(r.begin_wal.len() == 24 && r.end_wal >= r.begin_wal && r.begin_lsn.contains('/'), "{r:?}");
            assert_eq!(r.metadata.get("type").map(String::as_str), Some(*kind));
            assert_eq!(r.backup_id.chars().last(), Some(if *kind == "full" { 'F' } else { 'I' }), "{r:?}");
            r.backup_id
        })
        .collect();
    let info: serde_json::Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let held: Vec<&str> = info[0]["backups"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap()).collect();
    assert_eq!(held, labels.iter().map(String::as_str).collect::<Vec<_>>());

    rt.block_on(async {
        let ch = agent.channel().await;
        // A bad type is refused with its field, before anything runs.
        let e = BackupClient::new(ch.clone())
            .backup(BackupRequest {
                cluster_definition: cluster.clone(),
                backup_definition: serde_json::to_vec(&backup_json("b-bad", "weekly")).unwrap(),
                parameters: Default::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("spec.pluginConfiguration.parameters.type"), "{}", e.message());
        let mut m = MetricsClient::new(ch);
        let defined = m.define(DefineMetricsRequest { cluster_definition: cluster.clone() }).await.unwrap().into_inner();
        let collected = m.collect(CollectMetricsRequest { cluster_definition: cluster.clone() }).await.unwrap().into_inner();
        for c in &collected.metrics {
            let d = defined
                .metrics
                .iter()
                .find(|d| d.fq_name == c.fq_name)
                .unwrap_or_else(|| panic!("{} collected but not defined", c.fq_name));
            assert_eq!(c.variable_labels.len(), d.variable_labels.len(), "{}", c.fq_name);
            assert_eq!(c.variable_labels[0], "pg");
        }
        let value = |name: &str| collected.metrics.iter().find(|c| c.fq_name == name).map(|c| c.value);
        assert_eq!(value("pgkeep_backups"), Some(2.0));
        assert_eq!(value("pgkeep_pg_primary"), Some(1.0));
        assert!(value("pgkeep_agent_backup_last_success_seconds").is_some());
    });
    drop(agent);
    pg.stop_clean();
}

/// One recovery per kind of target: RestoreJobHooks restores into an
/// empty PGDATA, PostgreSQL starts with the returned configuration plus
/// CloudNativePG's target options, recovers through the plugin's WAL
/// Restore, and holds what the source held at the target. Archiving and
/// restoring are asynchronous here (`archive-async`: the spool, with the
/// agent's own worker and prefetcher tasks).
#[test]
fn the_recovery_job_reaches_each_kind_of_target() {
    let dir = TestDir::new("cnpgi-recovery");
    let repo = Repo::local(&dir, "repo");
    let pk = Pgkeep::new(&dir, "plugin", "pg");
    let json_path = write_json(&dir, "cluster", &cluster_json("pg", "pg", true, "pg-1"));
    let pg = cnpg_cluster(&dir, "pg-data", &dir.join("agent.sock"), &json_path);
    let spool = dir.mkdir("spool");
    let async_keys = |spool: &Path| format!("archive-async = true\nspool-path = \"{}\"\n", spool.display());
    pk.write_raw_config(&pk.config_text(&pg.addr, &repo).replacen("\n\n", &format!("\n{}\n", async_keys(&spool)), 1));
    let agent = PluginAgent::start(&dir, &pk, "agent", &json_path, &[]);
    pg.start();
    pg.pgbench_init(2);
    let rt = rt();
    let cluster = serde_json::to_vec(&cluster_json("pg", "pg", true, "pg-1")).unwrap();
    let backup = take_backup(&rt, &agent, &cluster, "b1", "full");
    let mut targets: Vec<(&str, serde_json::Value, String)> = Vec::new();
    targets.push(("immediate", json!({"targetImmediate": true}), pg.dump()));
    pg.pgbench(2, 2);
    let dump = pg.dump();
    let time = pg.psql("select to_char(now() at time zone 'utc', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'");
    std::thread::sleep(Duration::from_millis(1100));
    targets.push(("time", json!({"targetTime": time}), dump));
    pg.pgbench(2, 2);
    let dump = pg.dump();
    pg.psql("select pg_create_restore_point('before-the-cleanup')");
    targets.push(("name", json!({"targetName": "before-the-cleanup"}), dump));
    pg.pgbench(2, 2);
    let dump = pg.dump();
    let lsn = pg.psql("select pg_current_wal_lsn()");
    targets.push(("lsn", json!({"targetLSN": lsn}), dump));
    pg.pgbench(2, 2);
    let xid = pg.psql("begin; insert into pgbench_history (tid, bid, aid, delta) values (1, 1, 1, 42); select txid_current(); commit;");
    let dump = pg.dump();
    targets.push(("xid", json!({"targetXID": xid.lines().last().unwrap()}), dump));
    pg.psql("delete from pgbench_history");
    pg.pgbench(2, 2);
    let end = pg.dump();
    targets.push(("end", json!({}), end));
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);
    assert!(std::fs::read_dir(&spool).unwrap().next().is_some(), "archiving did not go through the spool");

    for (kind, target, expected) in &targets {
        // The recovery Job's sidecar: one config file per stanza, as the
        // operator-side plugin mounts the Stanzas' ConfigMaps; the source's
        // names the Job's PGDATA.
        let job_data = dir.join(&format!("restored-{kind}"));
        let configs = dir.mkdir(&format!("job-{kind}-stanzas"));
        for stanza in ["pg".to_owned(), format!("restored-{kind}")] {
            let spool = dir.mkdir(&format!("job-{kind}-spool"));
            let text = format!("[stanza.{stanza}]\npg-data = \"{}\"\n{}\n{}", job_data.display(), async_keys(&spool), repo.toml());
            std::fs::write(configs.join(format!("{stanza}.toml")), text).unwrap();
        }
        let mut job_pk = Pgkeep::new(&dir, &format!("job-{kind}"), "pg");
        job_pk.config = configs.join("pg.toml");
        let mut recovery = recovery_cluster_json("pg", &format!("restored-{kind}"), target.clone());
        // One of them with WAL on a volume of its own (spec.walStorage).
        let wal_dir = dir.join(&format!("wal-volume-{kind}")).join("pg_wal");
        if *kind == "end" {
            recovery["spec"]["walStorage"] = json!({"size": "1Gi"});
            std::fs::create_dir_all(wal_dir.parent().unwrap()).unwrap();
            run_ok(Command::new("chown").arg("postgres:postgres").arg(wal_dir.parent().unwrap()), Duration::from_secs(10));
        }
        let recovery_path = write_json(&dir, &format!("recovery-{kind}"), &recovery);
        let job = PluginAgent::start(
            &dir,
            &job_pk,
            &format!("job-{kind}"),
            &recovery_path,
            &["--plugin-config-dir", configs.to_str().unwrap(), "--plugin-wal-dir", wal_dir.to_str().unwrap()],
        );
        let config = rt.block_on(async {
            RestoreJobHooksClient::new(job.channel().await)
                .restore(RestoreRequest { cluster_definition: serde_json::to_vec(&recovery).unwrap(), check_empty_wal_archive: Some(true) })
                .await
                .unwrap_or_else(|s| panic!("{kind}: restore job: {s:?}\n{}", tail(&job.log, 20)))
                .into_inner()
        });
        assert!(config.restore_config.contains("recovery_target_action = 'promote'"), "{kind}: {config:?}");
        assert!(config.restore_config.contains("wal-restore %f %p"), "{kind}: {config:?}");
        // The restore left nothing of recovery, archiving or replication in
        // postgresql.auto.conf: CloudNativePG never empties it, PostgreSQL
        // reads it last and pg_basebackup copies it to every replica.
        let auto = std::fs::read_to_string(job_data.join("postgresql.auto.conf")).unwrap_or_default();
        for key in ["restore_command", "recovery_target", "archive_mode", "archive_command", "primary_conninfo"] {
            assert!(!auto.lines().any(|l| l.trim_start().starts_with(key)), "{kind}: {key} left in postgresql.auto.conf:\n{auto}");
        }
        // What CloudNativePG does with the answer (writeRecoveryConfiguration):
        // into custom.conf, which its postgresql.conf includes, archive_command
        // off while recovering, the plugin's settings, the target's options;
        // then recovery.signal.
        let mut custom = String::from("archive_command = 'false'\n");
        custom.push_str(&config.restore_config);
        custom.push_str(&cnpg_target_options(target));
        std::fs::write(job_data.join("custom.conf"), custom).unwrap();
        let conf = job_data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\ninclude_if_exists 'custom.conf'\n");
        std::fs::write(&conf, text).unwrap();
        std::fs::write(job_data.join("recovery.signal"), b"").unwrap();
        if *kind == "end" {
            assert_eq!(
                std::fs::read_link(job_data.join("pg_wal")).ok().as_deref(),
                Some(wal_dir.as_path()),
                "pg_wal is not a link to the WAL volume"
            );
        }
        let restored = Cluster::start_restored(&dir, &job_data);
        let what = format!("recovery to {kind} ({target}) from {}", backup.backup_id);
        assert_same_dump(&what, expected, &restored.dump());
        restored.amcheck();
        assert_eq!(restored.visibility_findings(), "0", "{what}");
        drop(restored);
        drop(job);
    }
    drop(agent);
    pg.stop_clean();
}

/// CloudNativePG's `RecoveryTarget.BuildPostgresOptions` (api/v1/cluster_funcs.go).
fn cnpg_target_options(t: &serde_json::Value) -> String {
    let mut o = Vec::new();
    let s = |k: &str| t.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
    if let Some(v) = s("targetTLI") {
        o.push(("recovery_target_timeline", v.to_owned()));
    }
    if let Some(v) = s("targetXID") {
        o.push(("recovery_target_xid", v.to_owned()));
    }
    if let Some(v) = s("targetName") {
        o.push(("recovery_target_name", v.to_owned()));
    }
    if let Some(v) = s("targetLSN") {
        o.push(("recovery_target_lsn", v.to_owned()));
    }
    if let Some(v) = s("targetTime") {
        o.push(("recovery_target_time", v.to_owned()));
    }
    if t.get("targetImmediate").and_then(|v| v.as_bool()) == Some(true) {
        o.push(("recovery_target", "immediate".to_owned()));
    }
    let exclusive = t.get("exclusive").and_then(|v| v.as_bool()) == Some(true);
    o.push(("recovery_target_inclusive", if exclusive { "false" } else { "true" }.to_owned()));
    o.sort();
    o.iter().map(|(k, v)| format!("{k} = '{}'\n", v.replace('\'', "''"))).collect()
}

/// While a cluster is bootstrapped, a WAL restore that fails for a reason
/// other than "not in the archive" (here a stored segment that does not
/// match its checksum) keeps retrying instead of answering: CloudNativePG
/// would turn any answer into "not found" and PostgreSQL would end
/// recovery there. A standby's restore answers the error after its retry
/// window. A restore from a recovery source whose stanza is not in the
/// config file is refused with the field that names it.
#[test]
fn a_bootstrap_restore_waits_out_an_unreadable_archive_instead_of_ending_recovery() {
    let (dir, repo, _pk, _json_path, pg, agent) =
        plugin_cluster("cnpgi-stall", &cluster_json("pg", "pg", true, "pg-1"), &["--plugin-standby-restore-retry", "1"]);
    pg.psql("create table t as select 1 a");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);
    // The stored copy of `seg`, one byte flipped.
    let stored = files_by_size(&repo.path().join("pg/archive"), ".zst")
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&seg))
        .expect("the archived segment");
    let good = std::fs::read(&stored).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&stored, &bad).unwrap();

    let rt = rt();
    let bootstrapping = serde_json::to_vec(&recovery_cluster_json("pg", "other", json!({}))).unwrap();
    let standby = serde_json::to_vec(&cluster_json("pg", "pg", true, "pg-1")).unwrap();
    let dest = dir.join("fetched");
    rt.block_on(async {
        let ch = agent.channel().await;
        let req = |cluster: &Vec<u8>| WalRestoreRequest {
            cluster_definition: cluster.clone(),
            source_wal_name: seg.clone(),
            destination_file_name: dest.display().to_string(),
            parameters: Default::default(),
            mode: Mode::Recovery as i32,
        };
        // A standby: the error, not NOT_FOUND, once its window has passed.
        let e = WalClient::new(ch.clone()).restore(req(&standby)).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e:?}");
        // Bootstrapping: no answer while the copy is bad...
        let mut wal = WalClient::new(ch.clone());
        let call = wal.restore(req(&bootstrapping));
        tokio::pin!(call);
        let waited = tokio::time::timeout(Duration::from_secs(4), &mut call).await;
        assert!(waited.is_err(), "a bootstrap restore answered while the archive could not be read: {waited:?}");
        assert!(!dest.exists());
        // ...and the file once it can be read again.
        std::fs::write(&stored, &good).unwrap();
        tokio::time::timeout(Duration::from_secs(30), call).await.expect("the restore goes on once the archive is readable").unwrap();
        assert!(dest.exists());
        // A recovery source that is not in the config file.
        let unknown = serde_json::to_vec(&recovery_cluster_json("missing", "other", json!({}))).unwrap();
        let e = RestoreJobHooksClient::new(ch)
            .restore(RestoreRequest { cluster_definition: unknown, check_empty_wal_archive: Some(true) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("stanza 'missing' is not in the config file"), "{}", e.message());
    });
    assert!(tail(&agent.log, 50).contains("retrying"), "the agent says why it waits:\n{}", tail(&agent.log, 20));
    drop(agent);
    pg.stop_clean();
}

/// CloudNativePG's default backup target is a standby: a full and an
/// incremental Backup taken through the standby's agent, which cannot
/// reach the primary (the standby is read alone; the primary's
/// archive_timeout archives the last segment), restore what the primary
/// had.
#[test]
fn full_and_incr_backups_from_a_standby_restore_what_the_primary_had() {
    let mut json = cluster_json("pg", "pg", true, "pg-1");
    json["spec"]["postgresql"]["parameters"]["archive_timeout"] = serde_json::json!("1s");
    let (dir, repo, pk, json_path, pg, agent) = plugin_cluster("cnpgi-standby", &json, &[]);
    pg.psql("alter system set archive_timeout = 1");
    pg.psql("select pg_reload_conf()");
    pg.pgbench_init(2);
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);
    let standby = Cluster::standby_of(&dir, "standby-data", &pg);
    // The standby's sidecar: its config names the standby.
    let standby_pk = Pgkeep::new(&dir, "standby", "pg");
    standby_pk.write_config(&standby.addr, &repo);
    let standby_agent = PluginAgent::start(&dir, &standby_pk, "standby-agent", &json_path, &[]);
    let rt = rt();
    let cluster = serde_json::to_vec(&json).unwrap();
    let mut labels = Vec::new();
    for kind in ["full", "incr"] {
        let load = pg.pgbench_background(6, 2);
        let r = take_backup(&rt, &standby_agent, &cluster, &format!("s-{kind}"), kind);
        load.wait_ok();
        labels.push(r.backup_id);
    }
    let info: serde_json::Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let backups = info[0]["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2);
    for (b, label) in backups.iter().zip(&labels) {
        assert_eq!((b["label"].as_str(), b["from"].as_str()), (Some(label.as_str()), Some("standby")), "{b}");
    }
    assert_eq!(backups[1]["type"], "incr");
    // The primary's state now, then a restore of the incremental to the
    // end of the archive.
    let expected = pg.dump();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);
    let target = dir.join("restored");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &labels[1]]);
    let restored = Cluster::start_restored(&dir, &target);
    assert_same_dump("a standby's incr restored to the end", &expected, &restored.dump());
    restored.amcheck();
    assert_eq!(restored.visibility_findings(), "0");
    drop(restored);
    drop((standby_agent, agent));
    drop(standby);
    pg.stop_clean();
}

/// CloudNativePG's instance manager, built from its Go module at the
/// version tools/cnpg-manager/go.mod pins (scripts/kube-testenv builds it).
fn cnpg_manager() -> PathBuf {
    let bin =
        std::env::var_os("PGKEEP_CNPG_MANAGER").map(PathBuf::from).unwrap_or_else(|| "/opt/pgkeep-test/kube-testenv/cnpg-manager".into());
    assert!(bin.exists(), "{} is missing: run scripts/kube-testenv build (scripts/test-setup does)", bin.display());
    bin
}

/// What the instance manager's commands ask of its own local web server
/// (`http://localhost:8010`, fixed in CloudNativePG's code): the Cluster it
/// caches (`GET /cache/cluster`), and a place to report archiving
/// (`POST /cluster/status/condition/wal/archive`). That server is the
/// instance manager's `instance run`, which needs its pod; this stands in
/// for it and serves the Cluster the test sets.
struct InstanceManagerCache {
    cluster: std::sync::Arc<std::sync::Mutex<String>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InstanceManagerCache {
    fn start(cluster: &serde_json::Value) -> InstanceManagerCache {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:8010").expect("port 8010 (CloudNativePG's local web server) is taken");
        let shared = std::sync::Arc::new(std::sync::Mutex::new(cluster.to_string()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut length = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let (status, text) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                    ["GET", "/cache/cluster"] => ("200 OK", c.lock().unwrap().clone()),
                    ["POST", _] => ("200 OK", "{}".to_owned()),
                    _ => ("404 Not Found", String::new()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        InstanceManagerCache { cluster: shared, stop, thread: Some(thread) }
    }

    fn set(&self, cluster: &serde_json::Value) {
        *self.cluster.lock().unwrap() = cluster.to_string();
    }
}

impl Drop for InstanceManagerCache {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect("127.0.0.1:8010");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client we did not write: PostgreSQL's archive_command and
/// restore_command are CloudNativePG's `manager wal-archive` and `manager
/// wal-restore` (v1.30.0), which find the plugin by its socket in
/// `PLUGIN_SOCKET_DIR`, check it with Identity, and call WAL Archive and
/// Restore. A cluster archives through it, and a recovery Job's
/// PostgreSQL replays through it to what the source had.
#[test]
fn cnpg_manager_archives_and_restores_through_the_plugin() {
    let manager = cnpg_manager();
    let dir = TestDir::new("cnpgi-manager");
    let repo = Repo::local(&dir, "repo");
    let pk = Pgkeep::new(&dir, "plugin", "pg");
    let cache = InstanceManagerCache::start(&cluster_json("pg", "pg", true, "pg-1"));
    let plugins = dir.mkdir("plugins");
    let pg = Cluster::initdb(&dir, "pg-data", None, &["-k"], &pg_bin());
    let archive = format!(
        "PLUGIN_SOCKET_DIR={} {} wal-archive --pod-name pg-1 --pg-data {} %p",
        plugins.display(),
        manager.display(),
        pg.addr.data.display()
    );
    let path = pg.addr.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("archive_mode = on\narchive_command = '{archive}'\n"));
    std::fs::write(&path, text).unwrap();
    // CloudNativePG's marker of a new data directory: 1.30.0's manager does
    // not send check_empty_wal_archive, so the plugin reads the marker.
    let marker = pg.addr.data.join(".check-empty-wal-archive");
    std::fs::write(&marker, b"").unwrap();
    run_ok(Command::new("chown").arg("postgres:postgres").arg(&marker), Duration::from_secs(10));
    pk.write_config(&pg.addr, &repo);
    let agent = PluginAgent::start_at(&dir, &pk, "agent", plugins.join("pgkeep.dev"), "unused", &[]);
    pg.start();
    pg.pgbench_init(2);
    let first = pg.switch_wal();
    pg.wait_archived(&first);
    let rt = rt();
    let cluster = serde_json::to_vec(&cluster_json("pg", "pg", true, "pg-1")).unwrap();
    let backup = take_backup(&rt, &agent, &cluster, "m1", "full");
    pg.pgbench(3, 2);
    let expected = pg.dump();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);
    assert!(!marker.exists(), "the plugin made the empty-archive check and removed the marker");

    // The recovery Job: the Cluster it sees is bootstrapping from pg.
    let recovery = recovery_cluster_json("pg", "restored", json!({}));
    cache.set(&recovery);
    let job_data = dir.join("restored");
    let configs = dir.mkdir("job-stanzas");
    for stanza in ["pg", "restored"] {
        let text = format!("[stanza.{stanza}]\npg-data = \"{}\"\n\n{}", job_data.display(), repo.toml());
        std::fs::write(configs.join(format!("{stanza}.toml")), text).unwrap();
    }
    let mut job_pk = Pgkeep::new(&dir, "job", "pg");
    job_pk.config = configs.join("pg.toml");
    let job_plugins = dir.mkdir("job-plugins");
    let restore_command = format!(
        "PLUGIN_SOCKET_DIR={} {} wal-restore --pod-name restored-1 --pg-data {} %f %p",
        job_plugins.display(),
        manager.display(),
        job_data.display()
    );
    let job = PluginAgent::start_at(
        &dir,
        &job_pk,
        "job",
        job_plugins.join("pgkeep.dev"),
        &restore_command,
        &["--plugin-config-dir", configs.to_str().unwrap()],
    );
    let config = rt.block_on(async {
        RestoreJobHooksClient::new(job.channel().await)
            .restore(RestoreRequest { cluster_definition: serde_json::to_vec(&recovery).unwrap(), check_empty_wal_archive: Some(true) })
            .await
            .unwrap_or_else(|s| panic!("restore job: {s:?}\n{}", tail(&job.log, 20)))
            .into_inner()
    });
    let mut custom = String::from("archive_command = 'false'\n");
    custom.push_str(&config.restore_config);
    custom.push_str(&cnpg_target_options(&json!({})));
    std::fs::write(job_data.join("custom.conf"), custom).unwrap();
    let conf = job_data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\ninclude_if_exists 'custom.conf'\n");
    std::fs::write(&conf, text).unwrap();
    std::fs::write(job_data.join("recovery.signal"), b"").unwrap();
    let restored = Cluster::start_restored(&dir, &job_data);
    assert_same_dump(&format!("recovery through CloudNativePG's manager from {}", backup.backup_id), &expected, &restored.dump());
    restored.amcheck();
    let log = std::fs::read_to_string(restored.log()).unwrap_or_default();
    assert!(log.contains("restored log file"), "PostgreSQL replayed no archived WAL through the manager:\n{}", tail(restored.log(), 30));
    drop(restored);
    drop((job, agent, cache));
    pg.stop_clean();
}
