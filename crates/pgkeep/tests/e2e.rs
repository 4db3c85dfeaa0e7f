//! End to end, against real PostgreSQL: a hot full backup taken while pgbench
//! writes, then marked changes at known points, then one restore per kind of
//! target into a new directory. Each restored cluster must start, promote,
//! hold exactly the marks up to its target, dump identically to the source's
//! dump taken at that point, and pass pg_amcheck.
//!
//! Run once on a local repository and once on S3 (moto).

mod support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::sleep;
use std::time::Duration;

use serde_json::Value;
use support::*;

#[test]
fn local_repository_restores_every_kind_of_target_exactly() {
    let dir = TestDir::new("e2e-local");
    let repo = Repo::local(&dir, "repo");
    backup_and_restore_every_target(&dir, &repo);
}

#[test]
fn s3_repository_restores_every_kind_of_target_exactly() {
    let moto = Moto::start("pgkeep-e2e");
    let dir = TestDir::new("e2e-s3");
    backup_and_restore_every_target(&dir, &moto.repo("ci/e2e"));
}

/// One point of the source's history to restore to.
struct Point {
    name: &'static str,
    /// `restore` arguments that select it.
    args: Vec<String>,
    /// The marks the restored cluster must hold, in order.
    marks: &'static str,
    /// The source's dump at that point.
    dump: String,
}

fn backup_and_restore_every_target(dir: &TestDir, repo: &Repo) {
    let (pg, pk) = cluster_with_config(dir, "demo", repo);
    pk.ok(&["stanza-create"]);
    pk.ok(&["check"]);
    pg.pgbench_init(5);
    // No sequence in marks: PostgreSQL logs sequences 32 values ahead, so a
    // recovered sequence legitimately differs from its source.
    pg.psql("create table marks (id int primary key, name text not null, at timestamptz not null default clock_timestamp())");

    // A hot backup: pgbench must be writing before, during and after it.
    let bench = pg.pgbench_background(15, 4);
    sleep(Duration::from_secs(2));
    let before = pg.count("pgbench_history");
    let b1 = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    let after = pg.count("pgbench_history");
    assert!(is_full_label(&b1), "backup printed {b1:?}, not a full backup label");
    assert!(after > before, "pgbench wrote nothing while the backup ran ({before} -> {after} history rows)");
    bench.wait_ok();

    let mark = |name: &str| pg.psql(&format!("insert into marks (id, name) select coalesce(max(id), 0) + 1, '{name}' from marks"));
    let mut points = Vec::new();
    let mut point = |name, args: &[&str], marks, dump| {
        points.push(Point { name, args: args.iter().map(|s| s.to_string()).collect(), marks, dump });
    };

    // (a) a named restore point
    mark("a");
    pg.psql("select pg_create_restore_point('rp1')");
    point("name", &["--target-name", "rp1"], "a", pg.dump());

    // (b) a time, with a quiet second after it
    mark("b");
    let t = pg.psql("select clock_timestamp()");
    point("time", &["--target-time", t.as_str()], "a,b", pg.dump());
    sleep(Duration::from_secs(1));

    // (c) an LSN
    mark("c");
    let l = pg.psql("select pg_current_wal_lsn()");
    point("lsn", &["--target-lsn", l.as_str()], "a,b,c", pg.dump());

    // (d) a transaction id: the insert and txid_current() in one transaction
    let x = pg.psql("with m as (insert into marks (id, name) values (4, 'd') returning 1) select txid_current() from m");
    point("xid", &["--target-xid", x.as_str()], "a,b,c,d", pg.dump());

    // (e) the end of a second, quiet full backup
    mark("e");
    let b2 = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    assert!(is_full_label(&b2) && b2 > b1, "second backup printed {b2:?} (first was {b1})");
    point("backup", &["--set", b2.as_str(), "--target-immediate"], "a,b,c,d,e", pg.dump());

    // (f) the end of the archive
    mark("f");
    let last = pg.switch_wal();
    pg.wait_archived(&last);
    point("end", &[], "a,b,c,d,e,f", pg.dump());

    let history = pg.count("pgbench_history");
    check_info(&pk, &pg, &[b1.as_str(), b2.as_str()], &last);

    // Every target is checked even when an earlier one fails, so that one
    // run tells which kinds of target work.
    let failed: Vec<&str> = points
        .iter()
        .filter(|p| catch_unwind(AssertUnwindSafe(|| restore_and_verify(dir, &pk, p, history))).is_err())
        .map(|p| p.name)
        .collect();
    assert!(failed.is_empty(), "restores to these targets failed (details above): {failed:?}");
}

/// Restores `p` into a new directory, starts it, and compares it with the
/// source at that point.
fn restore_and_verify(dir: &TestDir, pk: &Pgkeep, p: &Point, history_at_end: i64) {
    let target = dir.join(&format!("restore-{}", p.name));
    let mut args = vec!["restore".to_string(), "--pg-data".into(), target.display().to_string()];
    args.extend(p.args.iter().cloned());
    pk.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let restored = Cluster::start_restored(dir, &target);
    let marks = restored.psql("select string_agg(name, ',' order by id) from marks");
    assert_eq!(marks, p.marks, "restore to {} ({:?}) holds the wrong marks", p.name, p.args);
    assert_eq!(restored.count("pgbench_accounts"), 500_000, "restore to {}", p.name);
    if p.name == "end" {
        assert_eq!(restored.count("pgbench_history"), history_at_end, "restore to the end of the archive");
    }
    assert_same_dump(&format!("restore to {} ({:?})", p.name, p.args), &p.dump, &restored.dump());
    restored.amcheck();
    restored.stop();
    std::fs::remove_dir_all(&target).unwrap();
}

/// `info --output json` lists this stanza with both backups, oldest first,
/// and an archive range that reaches the last switched segment.
fn check_info(pk: &Pgkeep, pg: &Cluster, labels: &[&str], last_segment: &str) {
    let out = pk.ok(&["info", "--output", "json"]);
    let info: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("info --output json is not JSON ({e}):\n{out}"));
    let stanza = info
        .as_array()
        .expect("info --output json must be an array")
        .iter()
        .find(|s| s["stanza"] == "demo")
        .unwrap_or_else(|| panic!("stanza demo missing from {info}"));

    let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    assert_eq!(text(&stanza["system-id"]), pg.system_id(), "system-id in {stanza}");
    let major = (pg.psql("show server_version_num").parse::<u32>().unwrap() / 10000).to_string();
    assert_eq!(text(&stanza["pg-version"]), major, "pg-version in {stanza}");

    let (min, max) = (text(&stanza["archive"]["min"]), text(&stanza["archive"]["max"]));
    assert!(min.len() == 24 && max.len() == 24 && min <= max, "archive range {min}..{max}");
    assert!(max.as_str() >= last_segment, "archive max {max} is before the last archived segment {last_segment}");

    let backups = stanza["backups"].as_array().unwrap_or_else(|| panic!("backups missing: {stanza}"));
    let listed: Vec<&str> = backups.iter().map(|b| b["label"].as_str().unwrap_or("?")).collect();
    assert_eq!(listed, labels, "backups, oldest first");
    for b in backups {
        assert_eq!(b["type"], "full", "{b}");
        assert!(b["prior"].is_null(), "a full backup has no prior: {b}");
        for key in ["start-time", "stop-time"] {
            assert!(b[key].as_str().is_some_and(|t| t.len() >= 20 && t.as_bytes()[10] == b'T'), "{key} not RFC 3339: {b}");
        }
        let lsn_of = |key: &str| lsn(b[key].as_str().unwrap_or_else(|| panic!("{key} missing: {b}")));
        let (start, stop) = (lsn_of("start-lsn"), lsn_of("stop-lsn"));
        assert!(start <= stop, "start-lsn after stop-lsn: {b}");
        assert!(b["size"].as_u64().is_some_and(|n| n > 0), "size: {b}");
        assert!(b["repo-size"].as_u64().is_some_and(|n| n > 0), "repo-size: {b}");
        let second = |key: &str| b[key].as_str().unwrap()[..19].to_owned();
        assert!(second("start-time") <= second("stop-time"), "start-time after stop-time: {b}");
    }
}
