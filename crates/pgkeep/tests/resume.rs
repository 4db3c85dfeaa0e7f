//! Resuming a killed backup: the next backup takes the abandoned one over
//! (same label), keeps the files it had stored that did not change since
//! it began, copies the rest, and restores identical to the source. A
//! backup started while another runs is refused; an abandoned backup of
//! another type is removed.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The checkpoint of the one unfinished backup in `repo`: (label, content).
fn checkpoint(repo: &Repo) -> Option<(String, Value)> {
    let backups = repo.path().join("demo/backup");
    for dir in std::fs::read_dir(&backups).ok()?.flatten() {
        let path = dir.path();
        if path.join("manifest.json").exists() {
            continue;
        }
        // Written by rename: a read never sees half a file. The entries
        // are in chunks, `partial.<n>.json`, which the checkpoint counts.
        let read = |name: &str| -> Option<Value> {
            let text = std::fs::read_to_string(path.join(name)).ok()?;
            Some(serde_json::from_str::<Value>(&text).unwrap()["content"].clone())
        };
        let mut content = read("partial.json")?;
        let mut files = content["files"].as_array().cloned().unwrap_or_default();
        for n in 0..content["chunks"].as_u64().unwrap_or(0) {
            files.extend(read(&format!("partial.{n}.json"))?.as_array().cloned().unwrap_or_default());
        }
        content["files"] = Value::Array(files);
        return Some((dir.file_name().to_str().unwrap().to_owned(), content));
    }
    None
}

/// Waits until the running backup's checkpoint lists at least `n` of the
/// files `wanted` accepts.
fn wait_for_checkpoint(repo: &Repo, backup: &mut Background, n: usize, wanted: impl Fn(&str) -> bool) -> (String, Value) {
    let start = Instant::now();
    loop {
        if let Some((label, cp)) = checkpoint(repo) {
            if cp["files"].as_array().unwrap().iter().filter(|f| wanted(f["path"].as_str().unwrap())).count() >= n {
                return (label, cp);
            }
        }
        assert!(backup.running(), "the backup ended before its checkpoint listed {n} files: make the copy slower");
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint with {n} files after 300s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_backup_is_resumed_keeping_only_files_unchanged_since_it_began() {
    let (dir, repo, pg, pk) = local_stanza("resume");
    // Twenty tables of about 4 MB, each a file of its own, compressed at
    // zstd's slowest level on one worker: a copy slow enough to kill midway.
    for i in 0..20 {
        pg.psql(&format!("create table t{i} as select g, md5(g::text) || md5((g * {i})::text) as v from generate_series(1, 45000) g"));
    }
    pg.psql("vacuum (freeze, analyze)");
    pg.psql("checkpoint");
    // Files the attempt keeps must be a whole second older than its start.
    std::thread::sleep(Duration::from_millis(1500));
    let slow = ["backup", "--jobs", "1", "--compress-level", "19"];
    let tables: Vec<(String, String)> =
        (0..20).map(|i| (format!("t{i}"), pg.psql(&format!("select pg_relation_filepath('t{i}')")))).collect();
    let is_table = |path: &str| tables.iter().any(|(_, p)| p == path);

    let mut first = pk.spawn(&slow);
    let (label, _) = wait_for_checkpoint(&repo, &mut first, 0, |_| true);
    // A second backup while the first runs is refused, naming its process.
    let msg = pk.fails(&["backup"]);
    assert!(msg.contains("backup is running") && msg.contains(&format!("pid {}", first.pid())), "{msg}");
    let (_, cp) = wait_for_checkpoint(&repo, &mut first, 3, is_table);
    drop(first); // SIGKILL
    let listed: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    assert_eq!(listed[0]["backups"].as_array().unwrap().len(), 0, "a killed backup is not listed: {listed}");

    // Change one file the attempt had stored: it must be copied again.
    let stored: Vec<Value> = cp["files"].as_array().unwrap().clone();
    let (changed_table, changed_path) =
        tables.iter().find(|(_, path)| stored.iter().any(|f| f["path"] == path.as_str())).expect("a table file in the checkpoint").clone();
    pg.psql(&format!("update {changed_table} set v = 'changed' where g % 100 = 0"));
    pg.psql("checkpoint");
    let expected = pg.dump();

    let report: Value = serde_json::from_str(&pk.ok(&["backup", "--output", "json"])).unwrap();
    assert_eq!(report["label"], label.as_str(), "the resumed backup keeps the interrupted one's label: {report}");
    let kept = report["resumed-files"].as_u64().unwrap_or(0);
    assert!(kept >= 2 && kept < stored.len() as u64, "{kept} of {} stored files should be kept: {report}", stored.len());

    let manifest = read_manifest(&repo, &label);
    let files = manifest["files"].as_array().unwrap();
    let entry = |path: &str| files.iter().find(|f| f["path"] == path).unwrap_or_else(|| panic!("{path} not in the manifest")).clone();
    let old = stored.iter().find(|f| f["path"] == changed_path.as_str()).unwrap();
    assert_ne!(entry(&changed_path)["checksum"], old["checksum"], "{changed_path} changed after the attempt and must be copied again");
    let same = stored.iter().filter(|f| entry(f["path"].as_str().unwrap()) == **f).count() as u64;
    assert_eq!(same, kept, "the kept files are the attempt's entries, unchanged");

    // No checkpoint and no stray object left: every object is named by the manifest.
    let backup_dir = repo.path().join("demo/backup").join(&label);
    let keys: std::collections::BTreeSet<String> =
        files.iter().filter_map(|f| f["key"].as_str()).map(|k| k.trim_start_matches(&format!("backup/{label}/")).to_owned()).collect();
    for (path, _) in snapshot(&backup_dir) {
        let rel = path.to_str().unwrap().to_owned();
        let list = manifest["file-list"]["key"].as_str().map(|k| k.trim_start_matches(&format!("backup/{label}/")));
        assert!(rel == "manifest.json" || Some(rel.as_str()) == list || keys.contains(&rel), "{rel} is left in the backup's directory");
    }

    let target = dir.join("restored");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &label, "--target-immediate"]);
    let restored = Cluster::start_restored(&dir, &target);
    assert_same_dump("restore of the resumed backup", &expected, &restored.dump());
    restored.amcheck();
    drop(restored);

    // An abandoned incr is not resumable by a full: it is removed.
    let mut incr = pk.spawn(&["backup", "--type", "incr"]);
    let (incr_label, _) = wait_for_checkpoint(&repo, &mut incr, 0, |_| true);
    drop(incr);
    let r = pk.run(&["backup", "--type", "full"]);
    assert!(r.status.success(), "{}", r.stderr);
    if !completed(&repo, &incr_label) {
        assert!(r.stderr.contains(&format!("removed the unfinished backup {incr_label}")), "{}", r.stderr);
        assert!(!repo.path().join("demo/backup").join(&incr_label).exists(), "the abandoned incr must be gone");
    }
    let listed: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let types: Vec<&str> = listed[0]["backups"].as_array().unwrap().iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert!(types == ["full", "full"] || types == ["full", "incr", "full"], "{listed}");
}

/// Whether the backup finished (an incr of nothing may, before the kill).
fn completed(repo: &Repo, label: &str) -> bool {
    repo.path().join("demo/backup").join(label).join("manifest.json").exists()
}
