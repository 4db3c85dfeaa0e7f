//! `stanza-upgrade` after a real `pg_upgrade` from PostgreSQL 15 (Debian)
//! to 17 and to 18 (installed by `scripts/install-postgres`), in copy and in
//! `--link` mode (where the new cluster's relation files are the old
//! ones' inodes, and the old cluster may not start again): before it, the new system's backup and archive-push are refused in one
//! line saying to run it, the repository unchanged; after it, the first
//! backup is full, the old cluster (started again after a copy-mode
//! upgrade) may no longer archive, each system's backups restore with its
//! own binaries from its own WAL, and expiring the old system's last
//! backup takes its whole archive with it.

mod support;

use std::path::Path;

use support::*;

/// The completed segments in `data`'s `pg_wal`, oldest first.
fn segments_in(data: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(data.join("pg_wal"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    out.sort();
    out
}

fn info(pk: &Pgkeep) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    v[0].clone()
}

#[test]
fn after_pg_upgrade_15_to_18_the_stanza_keeps_both_systems_apart_and_restorable() {
    upgrade_keeps_both_systems_apart_and_restorable(18, Mode::Copy);
}

#[test]
fn after_pg_upgrade_15_to_18_in_link_mode_the_stanza_keeps_both_systems_apart_and_restorable() {
    upgrade_keeps_both_systems_apart_and_restorable(18, Mode::Link);
}

#[test]
fn after_pg_upgrade_15_to_17_the_stanza_keeps_both_systems_apart_and_restorable() {
    upgrade_keeps_both_systems_apart_and_restorable(17, Mode::Copy);
}

#[test]
fn after_pg_upgrade_15_to_17_in_link_mode_the_stanza_keeps_both_systems_apart_and_restorable() {
    upgrade_keeps_both_systems_apart_and_restorable(17, Mode::Link);
}

/// How `pg_upgrade` makes the new cluster's files.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Copies them: the old cluster stays whole.
    Copy,
    /// `--link`: hard links, the same inodes (and birth times) as the old
    /// cluster's; the old cluster must not start again.
    Link,
}

fn upgrade_keeps_both_systems_apart_and_restorable(to: u32, mode: Mode) {
    let dir = TestDir::new(&format!("stanza-upgrade-{to}-{mode:?}").to_lowercase());
    let repo = Repo::local(&dir, "repo");
    let pk = Pgkeep::new(&dir, "pgkeep", "demo");
    let (bin15, bin_new) = (pg_bin_of(15), pg_bin_of(to));

    // PostgreSQL 15: a full and an incremental backup under writes.
    let old = Cluster::initdb(&dir, "old", Some(&pk), &["-k"], &bin15);
    old.pg_ctl_start(&[]);
    pk.write_config(&old.addr, &repo);
    pk.ok(&["stanza-create"]);
    old.pgbench_init(2);
    let full15 = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    old.pgbench(3, 2);
    let incr15 = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();
    old.psql("create table marker as select 'before the upgrade'::text as what");
    let last15 = old.switch_wal();
    old.wait_archived(&last15);
    let dump15 = old.dump();
    let system15 = old.system_id();
    old.stop_clean();

    // pg_upgrade: in copy mode the old cluster stays as it was.
    let new = Cluster::initdb(&dir, "new", Some(&pk), &["-k"], &bin_new);
    let upgrade = run(
        as_postgres(bin_new.join("pg_upgrade"), dir.path())
            .arg("-b")
            .arg(&bin15)
            .arg("-B")
            .arg(&bin_new)
            .args(if mode == Mode::Link { &["--link"][..] } else { &[] })
            .arg("-d")
            .arg(&old.addr.data)
            .arg("-D")
            .arg(&new.addr.data)
            .args(["-p", &free_port().to_string(), "-P", &free_port().to_string(), "-s"])
            .arg(dir.path()),
        std::time::Duration::from_secs(600),
    );
    assert!(upgrade.status.success(), "pg_upgrade failed:\n{}\n{}", upgrade.stdout, upgrade.stderr);
    if mode == Mode::Link {
        use std::os::unix::fs::MetadataExt;
        let linked = snapshot(&new.addr.data.join("base"))
            .keys()
            .any(|p| std::fs::metadata(new.addr.data.join("base").join(p)).unwrap().nlink() > 1);
        assert!(linked, "pg_upgrade --link left no relation file shared with the old cluster");
    }
    pk.write_config(&new.addr, &repo);
    new.start();
    let system_new = new.system_id();
    assert_ne!(system15, system_new, "pg_upgrade makes a new system");

    // Before stanza-upgrade: refused in one line, nothing written.
    new.psql("create table after_upgrade as select g from generate_series(1, 1000) g");
    let first_new = new.switch_wal();
    let before = snapshot(repo.path());
    let line = pk.fails(&["backup"]);
    assert!(line.contains(&system_new) && line.contains("stanza-upgrade"), "{line}");
    let wal = new.addr.data.join("pg_wal").join(&first_new);
    let line = pk.fails(&["archive-push", wal.to_str().unwrap()]);
    assert!(line.contains(&format!("WAL file {first_new}")) && line.contains("stanza-upgrade"), "{line}");
    assert!(before == snapshot(repo.path()), "a refused backup or archive-push changed the repository");

    // Pointed at a cluster that is not the upgrade of the stanza's (a new
    // initdb: its WAL position is behind the stanza's archive),
    // stanza-upgrade refuses, in one line, the repository unchanged.
    let stray = Cluster::initdb(&dir, "stray", None, &["-k"], &bin_new);
    stray.start();
    pk.write_config(&stray.addr, &repo);
    let before = snapshot(repo.path());
    let line = pk.fails(&["stanza-upgrade"]);
    assert!(line.contains("does not look like the cluster pg_upgrade made") && line.contains("--force"), "{line}");
    assert!(before == snapshot(repo.path()), "a refused stanza-upgrade changed the repository");
    drop(stray);
    pk.write_config(&new.addr, &repo);

    // stanza-upgrade records the new system beside the old one; again, it
    // changes nothing.
    let out = pk.ok(&["stanza-upgrade"]);
    assert!(out.contains(&format!("system {system15} (PostgreSQL 15) -> system {system_new} (PostgreSQL {to})")), "{out}");
    let out = pk.ok(&["stanza-upgrade"]);
    assert!(out.contains("already holds"), "{out}");

    // PostgreSQL's own retry now archives what was refused; the first
    // backup is full whatever was asked, then incrementals of the new
    // system.
    new.wait_archived(&first_new);
    let r = pk.run(&["backup", "--type", "incr"]);
    assert!(r.status.success(), "{}", r.stderr);
    let full_new = r.stdout.trim().to_owned();
    assert!(is_full_label(&full_new) && r.stderr.contains("of another system"), "{full_new}: {}", r.stderr);
    new.pgbench(3, 2);
    let incr_new = pk.ok(&["backup"]).trim().to_owned();
    assert!(!is_full_label(&incr_new), "{incr_new}");
    new.psql("insert into after_upgrade values (0)");
    let last_new = new.switch_wal();
    new.wait_archived(&last_new);
    let dump_new = new.dump();

    // The old cluster (which a copy-mode upgrade leaves whole, and which
    // may be started again; --link leaves its WAL) may no longer archive
    // into the stanza.
    let old_wal = old.addr.data.join("pg_wal").join(segments_in(&old.addr.data).pop().expect("the old cluster's WAL"));
    // (The new cluster archives meanwhile: compare the old system's part.)
    let old_part = || (snapshot(&repo.path().join("demo/archive")), snapshot(&repo.path().join("demo/backup")));
    let before = old_part();
    let line = pk.fails(&["archive-push", old_wal.to_str().unwrap()]);
    assert!(line.contains(&system15) && line.contains("held before"), "{line}");
    assert!(before == old_part(), "a refused archive-push changed the repository");

    // info: both systems, each backup with its own.
    let i = info(&pk);
    assert_eq!(i["system-id"], system_new.as_str());
    assert_eq!(i["pg-version"], to.to_string());
    let history = i["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{i}");
    assert_eq!((history[0]["system-id"].as_str(), history[0]["pg-version"].as_str()), (Some(system15.as_str()), Some("15")));
    assert_eq!((history[1]["system-id"].as_str(), history[1]["current"].as_bool()), (Some(system_new.as_str()), Some(true)));
    assert!(history[0]["archive"]["max"].as_str().is_some_and(|m| m >= last15.as_str()), "{i}");
    let of = |label: &str| i["backups"].as_array().unwrap().iter().find(|b| b["label"] == label).unwrap()["system-id"].clone();
    assert_eq!((of(&full15), of(&incr15)), (system15.clone().into(), system15.clone().into()));
    assert_eq!((of(&full_new), of(&incr_new)), (system_new.clone().into(), system_new.clone().into()));
    pk.ok(&["verify"]);

    // Each system restores with its own binaries from its own archive: the
    // old backup by --set (recovery asks archive-get for the old system's
    // WAL from the restored pg_control), the new by default.
    let r15 = dir.join("r15");
    pk.ok(&["restore", "--set", &incr15, "--pg-data", r15.to_str().unwrap()]);
    let c15 = Cluster::start_restored_of(&dir, &r15, &bin15);
    assert_same_dump("the PostgreSQL 15 backup restored", &dump15, &c15.dump());
    c15.amcheck();
    drop(c15);
    let r_new = dir.join("r_new");
    let out = pk.ok(&["restore", "--pg-data", r_new.to_str().unwrap()]);
    assert!(out.contains(&incr_new), "the default restore is of the current system: {out}");
    let c_new = Cluster::start_restored_of(&dir, &r_new, &bin_new);
    assert_same_dump(&format!("the PostgreSQL {to} backup restored"), &dump_new, &c_new.dump());
    c_new.amcheck();
    drop(c_new);

    // Expiring the old system's last backups removes its archive.
    let r = pk.run(&["expire", "--set", &full15, "--with-dependents"]);
    assert!(r.status.success() && r.stderr.contains(&full15) && r.stderr.contains(&incr15), "{}", r.stderr);
    let i = info(&pk);
    assert!(i["history"][0]["archive"]["min"].is_null(), "the old system's WAL outlived its last backup: {i}");
    assert!(i["history"][1]["archive"]["min"].is_string(), "the new system's WAL went too: {i}");
    assert!(snapshot(&repo.path().join("demo/archive")).is_empty(), "the old system's archive is not empty");
    pk.ok(&["verify"]);
}
