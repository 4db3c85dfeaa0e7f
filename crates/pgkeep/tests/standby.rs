//! Backups from a streaming standby (`backup-standby`), and restores that
//! make a standby (`restore --standby`), against real PostgreSQL: a primary
//! archiving into the repository and a standby made by `pg_basebackup -R`,
//! both on this machine.
//!
//! - Full, then incremental, then differential backups read from the
//!   standby while pgbench writes on the primary; each restored to the end
//!   of the archive equals the primary (pg_dump), passes pg_amcheck and
//!   pg_visibility's checks, and the incremental stores pages.
//! - `prefer` reads the primary while the standby is down and the standby
//!   again once it is back (as a full backup: another data directory).
//! - Each refusal (standby down, not streaming, of another system, lagging,
//!   falling behind during the backup, promoted during the backup) is one
//!   line and leaves the repository as it was.
//! - A replica provisioned from the repository streams and stays equal to
//!   the primary; after a failover the old primary comes back with
//!   `restore --delta --standby` and follows the new one.

mod support;

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The stanza's config with the standby keys: `mode` is `backup-standby`,
/// `extra` more keys of the stanza.
fn standby_config(pk: &Pgkeep, primary: &Cluster, standby: &PgAddr, repo: &Repo, mode: &str, extra: &str) {
    pk.write_raw_config(&standby_config_text(primary, standby, repo, mode, extra));
}

fn standby_config_text(primary: &Cluster, standby: &PgAddr, repo: &Repo, mode: &str, extra: &str) -> String {
    format!(
        "[stanza.demo]\npg-data = \"{}\"\npg-host = \"{}\"\npg-port = {}\npg-user = \"postgres\"\n\
         backup-standby = \"{mode}\"\nstandby-data = \"{}\"\nstandby-host = \"{}\"\nstandby-port = {}\n{extra}\n{}",
        primary.addr.data.display(),
        primary.addr.socket_dir.display(),
        primary.addr.port,
        standby.data.display(),
        standby.socket_dir.display(),
        standby.port,
        repo.toml()
    )
}

/// `backup --output json` with `args`: its JSON report and stderr.
fn backup_json(pk: &Pgkeep, args: &[&str]) -> (Value, String) {
    let mut all = vec!["--output", "json", "backup"];
    all.extend_from_slice(args);
    let r = pk.run(&all);
    assert!(r.status.success(), "pgkeep {all:?} failed: {}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("backup JSON ({e}): {}", r.stdout));
    (v, r.stderr)
}

/// Restores `label` into a new directory up to the end of the archive,
/// starts it, and compares it with `expected` (the primary's dump).
fn restore_equals(dir: &TestDir, pk: &Pgkeep, label: &str, expected: &str) {
    let target = dir.join(&format!("restore-{label}"));
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", label]);
    let restored = Cluster::start_restored(dir, &target);
    assert_same_dump(&format!("restore of standby backup {label}"), expected, &restored.dump());
    restored.amcheck();
    assert_eq!(restored.visibility_findings(), "0", "restore of {label}: pg_visibility findings");
    restored.stop();
    std::fs::remove_dir_all(&target).unwrap();
}

/// What the repository holds but the WAL the primary keeps archiving and
/// the lock objects (which any command may write, and mark released).
fn contents(repo: &Repo) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let moving = |p: &std::path::Path| {
        let p = p.to_string_lossy();
        p.contains("/lock/") || p.contains("/archive/")
    };
    snapshot(repo.path()).into_iter().filter(|(p, _)| !moving(p)).collect()
}

#[test]
fn full_incr_and_diff_from_a_standby_restore_what_the_primary_had() {
    let (dir, repo, pg, pk) = local_stanza("standby-chain");
    pg.pgbench_init(5);
    pg.psql("create table marks (id int primary key, at timestamptz default clock_timestamp())");
    let sb = Cluster::standby_of(&dir, "standby", &pg);
    standby_config(&pk, &pg, &sb.addr, &repo, "y", "");

    let mut labels = Vec::new();
    for (i, kind) in ["full", "incr", "diff"].into_iter().enumerate() {
        // pgbench writes on the primary before, during and after the
        // backup the standby serves.
        let bench = pg.pgbench_background(10, 2);
        sleep(Duration::from_secs(2));
        let before = pg.count("pgbench_history");
        let (report, stderr) = backup_json(&pk, &["--type", kind]);
        assert!(pg.count("pgbench_history") > before, "pgbench wrote nothing during the {kind} backup");
        bench.wait_ok();
        assert_eq!(report["from"], "standby", "{kind} backup: {report}\n{stderr}");
        assert_eq!(report["type"], kind, "{kind} backup: {report}\n{stderr}");
        assert!(report["full-because"].is_null(), "{kind} backup: {report}");
        assert!(stderr.contains("read the standby"), "{kind} backup says where it read: {stderr}");
        let label = report["label"].as_str().unwrap().to_owned();
        let manifest = read_manifest(&repo, &label);
        assert_eq!(manifest["from"], "standby");
        if kind == "incr" {
            let deltas = manifest["files"].as_array().unwrap().iter().filter(|f| f["delta"] == true).count();
            assert!(deltas > 0, "the incremental from the standby stored no file as pages: {manifest}");
        }
        pg.psql(&format!("insert into marks (id) values ({i})"));
        let expected = pg.dump();
        let last = pg.switch_wal();
        pg.wait_archived(&last);
        restore_equals(&dir, &pk, &label, &expected);
        labels.push(label);
    }
    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let from: Vec<&str> = info[0]["backups"].as_array().unwrap().iter().map(|b| b["from"].as_str().unwrap()).collect();
    assert_eq!(from, ["standby"; 3], "info: {info}");
}

#[test]
fn prefer_reads_the_primary_while_the_standby_is_down_and_refusals_are_one_line() {
    let (dir, repo, pg, pk) = local_stanza("standby-prefer");
    pg.pgbench_init(1);
    let sb = Cluster::standby_of(&dir, "standby", &pg);

    // prefer: the standby while it streams.
    standby_config(&pk, &pg, &sb.addr, &repo, "prefer", "");
    let (first, _) = backup_json(&pk, &["--type", "full"]);
    assert_eq!(first["from"], "standby", "{first}");

    // Down: prefer reads the primary and says why; y refuses.
    sb.stop_clean();
    let (fallback, stderr) = backup_json(&pk, &[]);
    assert_eq!(fallback["from"], "primary", "{fallback}");
    assert!(
        stderr.contains("NOTICE: backup") && stderr.contains("read the primary because the standby is not usable"),
        "prefer says why it read the primary: {stderr}"
    );
    assert!(fallback["full-because"].as_str().is_some_and(|w| w.contains("another data directory")), "{fallback}");
    standby_config(&pk, &pg, &sb.addr, &repo, "y", "");
    refused(&pk, &repo, "standby down", &["cannot connect", "set backup-standby to prefer"]);

    // Back: prefer reads the standby again.
    sb.start();
    sb.wait_streaming();
    standby_config(&pk, &pg, &sb.addr, &repo, "prefer", "");
    let (back, _) = backup_json(&pk, &[]);
    assert_eq!(back["from"], "standby", "{back}");

    // Not streaming: its primary_conninfo points nowhere.
    standby_config(&pk, &pg, &sb.addr, &repo, "y", "");
    let conninfo = sb.psql("show primary_conninfo");
    sb.psql("alter system set primary_conninfo = 'host=/nonexistent port=1'");
    sb.psql("select pg_reload_conf()");
    sb.wait_for("WAL receiver gone", "select count(*) from pg_stat_wal_receiver where status = 'streaming'", |s| s == "0");
    refused(&pk, &repo, "not streaming", &["is not streaming from the primary"]);
    sb.psql(&format!("alter system set primary_conninfo = '{}'", conninfo.replace('\'', "''")));
    sb.psql("select pg_reload_conf()");
    sb.wait_streaming();

    // Lagging: replay paused while the primary writes.
    sb.psql("select pg_wal_replay_pause()");
    pg.psql("create table lag as select g, repeat('x', 200) as p from generate_series(1, 20000) g");
    standby_config(&pk, &pg, &sb.addr, &repo, "y", "standby-max-lag = \"1MiB\"");
    refused(&pk, &repo, "lagging", &["behind the primary, more than standby-max-lag (1.0 MiB)"]);
    sb.psql("select pg_wal_replay_resume()");

    // Another system: standby-port names an unrelated server.
    let other = Cluster::new(&dir, "other", None);
    standby_config(&pk, &pg, &other.addr, &repo, "prefer", "");
    refused(&pk, &repo, "another system", &["is of another system", "fix standby-host/standby-port"]);

    // pg-* naming the standby.
    pk.write_config(&sb.addr, &repo);
    refused(&pk, &repo, "pg-* is a standby", &["is a standby: pg-host/pg-port must name the primary"]);
}

/// `backup` fails with one line holding every one of `expect`, and the
/// repository holds what it held before.
fn refused(pk: &Pgkeep, repo: &Repo, case: &str, expect: &[&str]) {
    let before = contents(repo);
    let err = pk.fails(&["backup"]);
    let line = err.trim();
    assert!(!line.contains('\n'), "{case}: more than one line: {err}");
    for e in expect {
        assert!(line.contains(e), "{case}: {e:?} not in {line:?}");
    }
    assert!(before == contents(repo), "{case}: the refused backup changed the repository");
    eprintln!("refusal ({case}): {line}");
}

/// Spawns a standby backup and, as soon as its work in the repository
/// shows, runs `disturb`; returns (whether `disturb` finished before the
/// backup exited, the backup's stderr, its exit status). The caller
/// judges the result only when `disturb` came first.
fn disturbed_backup(pk: &Pgkeep, repo: &Repo, disturb: impl FnOnce()) -> (bool, String, bool) {
    let backups = repo.path().join("demo/backup");
    let known: Vec<_> = std::fs::read_dir(&backups).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    let mut child = pk.spawn_piped(&["backup", "--type", "full"]);
    let start = Instant::now();
    // Copying has begun (so pg_backup_start has returned) once the new
    // backup's directory holds stored files, not only its checkpoint.
    let copying = || {
        std::fs::read_dir(&backups).map(|d| {
            d.flatten()
                .filter(|e| !known.contains(&e.file_name()))
                .any(|e| e.path().join("pg_data").exists() || e.path().join("bundle").exists())
        })
    };
    while !copying().unwrap_or(false) {
        assert!(start.elapsed() < Duration::from_secs(60), "the backup never started");
        if !child.running() {
            break;
        }
        sleep(Duration::from_millis(20));
    }
    disturb();
    let first = child.running();
    let (ok, stderr) = child.finish();
    (first, stderr, ok)
}

#[test]
fn a_standby_that_falls_behind_or_is_promoted_during_the_backup_is_refused() {
    let (dir, repo, pg, pk) = local_stanza("standby-during");
    // Big enough that copying takes a while on two cores.
    pg.pgbench_init(30);
    let sb = Cluster::standby_of(&dir, "standby", &pg);
    pk.write_raw_config(&format!("jobs = 1\n{}", standby_config_text(&pg, &sb.addr, &repo, "y", "standby-max-lag = \"8MiB\"")));

    let mut judged = 0;
    for attempt in 0..3 {
        let before = contents(&repo);
        let (first, stderr, ok) = disturbed_backup(&pk, &repo, || {
            sb.psql("select pg_wal_replay_pause()");
            pg.psql(&format!("create table burst{attempt} as select g, repeat('y', 300) as p from generate_series(1, 60000) g"));
        });
        sb.psql("select pg_wal_replay_resume()");
        if !first {
            eprintln!("attempt {attempt}: the backup ended before the standby fell behind (ok: {ok})");
            continue;
        }
        judged += 1;
        assert!(!ok, "a standby that fell 20 MB behind during the backup was accepted: {stderr}");
        let line = stderr.trim();
        assert!(line.contains("fell") && line.contains("behind the primary during the backup") && !line.contains('\n'), "{line}");
        assert!(before == contents(&repo), "the discarded backup left objects");
        eprintln!("refusal (fell behind): {line}");
        break;
    }
    assert!(judged > 0, "in 3 attempts the backup always ended before the standby fell behind");

    sb.wait_replayed(&pg.psql("select pg_current_wal_lsn()"));
    let before = contents(&repo);
    let (first, stderr, ok) = disturbed_backup(&pk, &repo, || sb.promote());
    if first {
        assert!(!ok, "a standby promoted during the backup was accepted: {stderr}");
        let line = stderr.trim();
        assert!(line.contains("was promoted during the backup") && !line.contains('\n'), "{line}");
        assert!(before == contents(&repo), "the discarded backup left objects");
        eprintln!("refusal (promoted): {line}");
    } else {
        eprintln!("the backup ended before the promotion (ok: {ok}); promotion case not judged");
    }
}

#[test]
fn a_replica_from_the_repository_streams_and_an_old_primary_comes_back_as_a_standby() {
    let (dir, _repo, pg, pk) = local_stanza("standby-restore");
    pg.pgbench_init(2);
    // amcheck cannot be installed on a standby: install it on the primary.
    pg.psql("create extension amcheck");
    pg.psql_in("template1", "create extension amcheck");
    pk.ok(&["backup", "--type", "full"]);
    pg.pgbench(3, 2);
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);

    // A replica provisioned from the repository: archive, then streaming.
    let replica_dir = dir.join("replica");
    let out = pk.ok(&[
        "--output",
        "json",
        "restore",
        "--pg-data",
        replica_dir.to_str().unwrap(),
        "--standby",
        "--primary-conninfo",
        &pg.conninfo(),
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["standby"], true, "{report}");
    assert!(replica_dir.join("standby.signal").exists() && !replica_dir.join("recovery.signal").exists());
    let replica = Cluster::start_standby(&dir, &replica_dir, true);
    replica.wait_streaming();
    pg.pgbench(3, 2);
    replica.wait_replayed(&pg.psql("select pg_current_wal_lsn()"));
    assert_eq!(replica.psql("select pg_is_in_recovery()"), "t");
    assert_same_dump("replica from the repository", &pg.dump(), &replica.dump());
    replica.amcheck();

    // Failover: the replica is promoted; the old primary, stopped, comes
    // back as its standby by a delta restore, following timeline 2.
    pg.stop_clean();
    replica.promote();
    replica.psql("create table after_failover as select 1 as x");
    let seg = replica.switch_wal();
    replica.wait_archived(&seg);
    let old = pg.addr.data.clone();
    let out = pk.ok(&["--output", "json", "restore", "--delta", "--standby", "--primary-conninfo", &replica.conninfo()]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["unchanged-files"].as_u64().unwrap() > 0, "a delta restore rewrote everything: {report}");
    assert!(old.join("standby.signal").exists() && !old.join("recovery.signal").exists());
    pg.start();
    pg.wait_streaming();
    replica.pgbench(3, 2);
    pg.wait_replayed(&replica.psql("select pg_current_wal_lsn()"));
    assert_eq!(pg.psql("select received_tli from pg_stat_wal_receiver"), "2", "the old primary follows timeline 2");
    assert_same_dump("old primary as a standby of the new one", &replica.dump(), &pg.dump());
    pg.amcheck();
}
