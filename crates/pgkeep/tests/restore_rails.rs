//! The rails of `restore` (issue 10): `--delta` rewrites only a data
//! directory of the backup's own system; `--force` leaves a tablespace's
//! own location outside the data directory alone; a copy restored
//! elsewhere does not archive into the stanza unless asked.

mod support;

use serde_json::Value;
use support::*;

#[test]
fn delta_restore_rewrites_only_a_data_directory_of_the_same_system() {
    let (dir, _repo, pg, pk) = local_stanza("rails-delta");
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    let expected = pg.dump();
    let label = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    let delta = |target: &std::path::Path| {
        pk.run(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &label, "--target-immediate", "--delta"])
    };

    // A directory of something else: a mistyped path must not be emptied.
    let other = dir.mkdir("not-a-cluster");
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let before = snapshot(&other);
    let r = delta(&other);
    assert!(!r.status.success(), "delta over a directory that is no data directory succeeded");
    assert!(r.stderr.contains("no PostgreSQL data directory") && r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(snapshot(&other), before, "the directory was changed");

    // The data directory of another cluster (another system identifier).
    let stranger = Cluster::new(&dir, "stranger", None);
    stranger.stop_clean();
    let stranger_dir = dir.join("stranger");
    let before = snapshot(&stranger_dir);
    let r = delta(&stranger_dir);
    assert!(!r.status.success(), "delta over another system's data directory succeeded");
    assert!(r.stderr.contains("another system"), "{}", r.stderr);
    assert_eq!(snapshot(&stranger_dir), before, "another cluster's data directory was changed");

    // An empty directory, then the restored one itself: both fine.
    let target = dir.join("restored");
    let r = delta(&target);
    assert!(r.status.success(), "{}", r.stderr);
    let r = delta(&target);
    assert!(r.status.success(), "a second delta over the same restore: {}", r.stderr);
    let restored = Cluster::start_restored(&dir, &target);
    assert_same_dump("delta restore into a new directory", &expected, &restored.dump());
}

#[test]
fn force_leaves_a_tablespace_in_its_own_location_alone() {
    let (dir, _repo, pg, pk) = local_stanza("rails-tablespace");
    let ts = dir.mkdir("ts-live");
    pg.psql(&format!("create tablespace ts location '{}'", ts.display()));
    pg.psql("create table t tablespace ts as select g from generate_series(1, 5000) g");
    pk.ok(&["backup", "--type", "full"]);
    pg.psql("checkpoint");
    let before = snapshot(&ts);
    assert!(!before.is_empty());

    // --force empties the data directory asked for, but the tablespace's
    // location is the live cluster's: refused, nothing touched.
    let target = dir.mkdir("restored");
    std::fs::write(target.join("old-file"), "x").unwrap();
    let r = pk.run(&["restore", "--pg-data", target.to_str().unwrap(), "--force"]);
    assert!(!r.status.success(), "--force emptied a tablespace outside the data directory");
    assert!(r.stderr.contains("--force-tablespaces") && r.stderr.contains("--tablespace-map"), "{}", r.stderr);
    assert_eq!(snapshot(&ts), before, "the live tablespace was changed");
    assert!(target.join("old-file").exists(), "the refused restore changed its target");
    assert_eq!(pg.count("t"), 5000);

    // Mapped elsewhere, --force is enough.
    let mapped = dir.join("ts-mapped");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--force", "--tablespace-map", &format!("ts={}", mapped.display())]);
    let restored = Cluster::start_restored(&dir, &target);
    assert_eq!(restored.count("t"), 5000);
    assert_eq!(snapshot(&ts), before, "the live tablespace was changed");
}

#[test]
fn a_copy_restored_elsewhere_does_not_archive_unless_asked() {
    let (dir, _repo, pg, pk) = local_stanza("rails-archive");
    pg.psql("create table t as select 1 a");
    pk.ok(&["backup", "--type", "full"]);
    let auto = |target: &std::path::Path| std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();

    let clone = dir.join("clone");
    let out: Value =
        serde_json::from_str(&pk.ok(&["restore", "--pg-data", clone.to_str().unwrap(), "--target-immediate", "--output", "json"])).unwrap();
    assert_eq!(out["archive-mode"], "off", "{out}");
    assert!(auto(&clone).lines().any(|l| l == "archive_mode = 'off'"), "{}", auto(&clone));
    // Restored again over itself: one line, not two.
    pk.ok(&["restore", "--pg-data", clone.to_str().unwrap(), "--target-immediate", "--delta"]);
    assert_eq!(auto(&clone).matches("archive_mode").count(), 1, "{}", auto(&clone));

    let kept = dir.join("kept");
    let out: Value = serde_json::from_str(&pk.ok(&[
        "restore",
        "--pg-data",
        kept.to_str().unwrap(),
        "--target-immediate",
        "--archive-mode",
        "preserve",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(out["archive-mode"], "preserve", "{out}");
    assert!(!auto(&kept).contains("archive_mode"), "{}", auto(&kept));
    assert_eq!(out["target-timeline"], "current", "--target-immediate stays on the backup's timeline: {out}");
}
