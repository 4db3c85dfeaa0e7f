//! Differential and page-level incremental backups: a chain full -> incr
//! -> incr -> diff -> incr, each restored (with `--set`, to the end of that
//! backup) identical to the source at that point; an incr after a small
//! update stores a few pages of the big table, not the table.

mod support;

use serde_json::Value;
use support::*;

#[test]
fn full_incr_diff_chain_restores_every_backup_and_stores_only_changed_pages() {
    let (dir, repo, pg, pk) = local_stanza("incremental");
    pg.pgbench_init(10);
    pg.psql("vacuum (freeze, analyze)");
    pg.psql("checkpoint");

    let mut points: Vec<(String, String)> = Vec::new();
    // Dump first, then back up with nothing written in between: the dump
    // is the state the backup restores to, and the hint bits its reads set
    // are written before the backup starts, not counted in the next incr.
    let mut take = |args: &[&str]| {
        let dump = pg.dump();
        let mut all = vec!["backup"];
        all.extend_from_slice(args);
        let label = pk.ok(&all).trim().to_owned();
        points.push((label.clone(), dump));
        label
    };

    let full = take(&["--type", "full"]);
    pg.pgbench(5, 2);
    let incr1 = take(&["--type", "incr"]);
    pg.psql("update pgbench_accounts set abalance = abalance + 1 where aid between 500000 and 500040");
    let incr2 = take(&[]); // no --type: incr, as a full exists
    pg.pgbench(5, 2);
    let diff = take(&["--type", "diff"]);
    pg.psql("delete from pgbench_history where mtime < now() - interval '1 second'");
    pg.psql("vacuum pgbench_history");
    let incr3 = take(&["--type", "incr"]);

    for (l, suffix) in [(&incr1, 'I'), (&incr2, 'I'), (&diff, 'D'), (&incr3, 'I')] {
        assert!(l.starts_with(&format!("{full}_")) && l.ends_with(suffix), "label {l} should extend {full} and end in {suffix}");
    }

    // info: types and priors.
    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let backups = info[0]["backups"].as_array().unwrap();
    let shape: Vec<(String, String, String)> = backups
        .iter()
        .map(|b| (b["label"].as_str().unwrap().into(), b["type"].as_str().unwrap().into(), b["prior"].as_str().unwrap_or("-").into()))
        .collect();
    let expected: Vec<(String, String, String)> = [
        (&full, "full", "-".to_string()),
        (&incr1, "incr", full.clone()),
        (&incr2, "incr", incr1.clone()),
        (&diff, "diff", full.clone()),
        (&incr3, "incr", diff.clone()),
    ]
    .into_iter()
    .map(|(l, t, p)| (l.clone(), t.to_string(), p))
    .collect();
    assert_eq!(shape, expected);

    // The small update: a handful of pages of pgbench_accounts, not its 16,000.
    let accounts = pg.psql("select pg_relation_filepath('pgbench_accounts')");
    // Its 130 MB are stored in parts of 64 MiB, in the full and the deltas.
    for label in [&full, &incr2] {
        let m = read_manifest(&repo, label);
        let e = m["files"].as_array().unwrap().iter().find(|f| f["path"] == accounts.as_str()).unwrap().clone();
        assert_eq!(e["parts"].as_array().map_or(0, Vec::len), 3, "{label}: {e}");
    }
    let manifest = read_manifest(&repo, &incr2);
    let entry =
        manifest["files"].as_array().unwrap().iter().find(|f| f["path"] == accounts.as_str()).expect("pgbench_accounts in the manifest");
    let pages = entry["pages"].as_u64().unwrap_or(0);
    assert_eq!(entry["delta"], true, "{entry}");
    assert!((1..=20).contains(&pages), "the update of 41 rows stored {pages} pages of pgbench_accounts: {entry}");
    let full_size = backups[0]["repo-size"].as_u64().unwrap();
    let incr2_size = backups[2]["repo-size"].as_u64().unwrap();
    assert!(incr2_size * 20 < full_size, "incr after a small update stored {incr2_size} bytes, the full {full_size}");
    let untouched = manifest["files"].as_array().unwrap().iter().filter(|f| f["delta"] == true && f["key"].is_null()).count();
    assert!(untouched > 100, "unchanged relation files should store nothing ({untouched} did)");

    // Small files are bundled: far fewer objects than files.
    let full_files = read_manifest(&repo, &full)["files"].as_array().unwrap().len();
    let full_objects = snapshot(&repo.path().join("demo/backup").join(&full)).len();
    assert!(full_files > 900 && full_objects * 10 < full_files, "{full_objects} objects for {full_files} files");

    for (label, dump) in &points {
        let target = dir.join(&format!("restore-{label}"));
        pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", label, "--target-immediate"]);
        let restored = Cluster::start_restored(&dir, &target);
        assert_same_dump(&format!("restore of {label}"), dump, &restored.dump());
        restored.amcheck();
        drop(restored);
        std::fs::remove_dir_all(&target).unwrap();
    }
}

/// `restore --delta` onto a directory that went on living after a restore:
/// it keeps the files that still hold the backup's content, rewrites the
/// rest, removes what the backup does not have, and the result is the
/// backup's state exactly. Over a running cluster it is refused.
#[test]
fn delta_restore_rewrites_only_what_differs() {
    let (dir, _repo, pg, pk) = local_stanza("delta-restore");
    pg.pgbench_init(5);
    pg.psql("vacuum (freeze, analyze)");
    let expected = pg.dump();
    let full = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    pg.pgbench(3, 2);
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();

    let target = dir.join("restored");
    let restore = |args: &[&str]| {
        let mut all = vec!["restore", "--pg-data", target.to_str().unwrap(), "--target-immediate", "--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str::<Value>(&pk.ok(&all)).unwrap()
    };
    restore(&["--set", &incr]);
    let live = Cluster::start_restored(&dir, &target);
    live.psql("create table extra as select g from generate_series(1, 10000) g");
    live.psql("update pgbench_branches set bbalance = bbalance + 1");
    live.psql("checkpoint");
    let msg = pk.fails(&["restore", "--pg-data", target.to_str().unwrap(), "--delta", "--set", &full]);
    assert!(msg.contains("running"), "{msg}");
    drop(live); // stopped hard, as after a crash

    let report = restore(&["--delta", "--set", &full]);
    let (files, unchanged, removed) =
        (report["files"].as_u64().unwrap(), report["unchanged-files"].as_u64().unwrap(), report["removed"].as_u64().unwrap());
    assert!(unchanged * 2 > files, "most files should be kept: {report}");
    assert!(unchanged < files, "changed files must be rewritten: {report}");
    assert!(removed > 0, "the new table's file and the old WAL must go: {report}");

    let back = Cluster::start_restored(&dir, &target);
    assert_same_dump("delta restore of the full backup", &expected, &back.dump());
    back.amcheck();
}
