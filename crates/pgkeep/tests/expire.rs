//! Retention: `expire` by count of fulls and diffs across full/diff/incr
//! chains (after a backup and on its own), the WAL range it keeps, dry
//! runs, and removing one backup with and without its dependents. Every
//! backup left restores.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::*;

/// Archived segment names (24 hex digits) in the local repository.
fn archived_segments(repo: &Repo) -> BTreeSet<String> {
    snapshot(&repo.path().join("demo/archive"))
        .into_keys()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            let (wal, _) = name.split_once('-')?;
            (wal.len() == 24).then(|| wal.to_owned())
        })
        .collect()
}

fn labels(pk: &Pgkeep) -> Vec<String> {
    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    info[0]["backups"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap().to_owned()).collect()
}

/// Every segment from `first` to `last` (one timeline, 16 MB segments).
fn continuous(have: &BTreeSet<String>, first: &str, last: &str) -> Result<(), String> {
    let n = |s: &str| u64::from_str_radix(&s[8..16], 16).unwrap() * 256 + u64::from_str_radix(&s[16..24], 16).unwrap();
    for k in n(first)..=n(last) {
        let name = format!("{}{:08X}{:08X}", &first[..8], k / 256, k % 256);
        if !have.contains(&name) {
            return Err(format!("segment {name} is missing between {first} and {last}"));
        }
    }
    Ok(())
}

#[test]
fn retention_keeps_whole_chains_and_the_wal_they_need() {
    let (dir, repo, pg, pk) = local_stanza("expire");
    pg.pgbench_init(1);
    let mut dumps = std::collections::HashMap::new();
    let mut take = |args: &[&str]| {
        pg.pgbench(1, 2);
        let dump = pg.dump();
        let mut all = vec!["backup"];
        all.extend_from_slice(args);
        let label = pk.ok(&all).trim().to_owned();
        dumps.insert(label.clone(), dump);
        label
    };
    let f1 = take(&["--type", "full"]);
    let d1 = take(&["--type", "diff"]);
    let _i1 = take(&["--type", "incr"]);
    let _d2 = take(&["--type", "diff"]);
    let f2 = take(&["--type", "full"]);
    let d3 = take(&["--type", "diff"]);
    let i2 = take(&["--type", "incr"]);
    let d4 = take(&["--type", "diff"]);
    assert_eq!(labels(&pk).len(), 8, "no retention configured: nothing expires");
    let wal_before = archived_segments(&repo);

    // A dry run says what would go and changes nothing.
    let before = snapshot(repo.path());
    let r = pk.run(&["expire", "--retention-full", "1", "--dry-run"]);
    assert!(r.status.success(), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("would expire full backup {f1}")) && r.stderr.contains(&format!("would expire diff backup {d1}")),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(&format!("backup {f2}")), "{}", r.stderr);
    assert_eq!(snapshot(repo.path()).keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "a dry run removes nothing");

    // Retention runs after a backup: two fulls, one diff.
    let r = pk.run(&["backup", "--type", "full", "--retention-full", "2", "--retention-diff", "1", "--output", "json"]);
    assert!(r.status.success(), "{}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let f3 = report["label"].as_str().unwrap().to_owned();
    let expired: Vec<&str> = report["expire"]["expired"].as_array().unwrap().iter().map(|e| e["label"].as_str().unwrap()).collect();
    assert_eq!(expired.len(), 6, "F1's chain (4) and the older diff of F2 with its incr: {report}");
    assert_eq!(labels(&pk), vec![f2.clone(), d4.clone(), f3.clone()], "kept: the newest two fulls and the newest diff");
    for gone in expired {
        assert!(!repo.path().join("demo/backup").join(gone).exists(), "{gone} must be gone");
    }
    assert!(!labels(&pk).contains(&d3) && !labels(&pk).contains(&i2));

    // WAL: nothing before F2's start, everything from there to the end.
    let start = |label: &str| read_manifest(&repo, label)["start-wal"].as_str().unwrap().to_owned();
    let wal = archived_segments(&repo);
    let (first, last) = (wal.first().unwrap().clone(), wal.last().unwrap().clone());
    assert_eq!(first, start(&f2), "the oldest WAL kept is the oldest kept backup's start");
    assert!(wal_before.iter().any(|s| *s < first), "WAL before F2 existed and was removed");
    continuous(&wal, &first, &last).unwrap();

    // Removing one backup: refused while another builds on it.
    let msg = pk.fails(&["expire", "--set", &f2]);
    assert!(msg.contains(&d4) && msg.contains("--with-dependents"), "{msg}");
    assert_eq!(labels(&pk).len(), 3);
    let msg = pk.fails(&["expire", "--set", "20200101-000000F"]);
    assert!(msg.contains("does not exist"), "{msg}");

    // The kept backups restore, the oldest one included.
    for label in [&f2, &d4] {
        let target = dir.join(&format!("restore-{label}"));
        pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", label, "--target-immediate"]);
        let restored = Cluster::start_restored(&dir, &target);
        assert_same_dump(&format!("restore of {label}"), &dumps[label], &restored.dump());
        restored.amcheck();
    }

    let r = pk.run(&["expire", "--set", &f2, "--with-dependents"]);
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(labels(&pk), vec![f3.clone()]);
    assert_eq!(archived_segments(&repo).first().unwrap(), &start(&f3));
}
