//! Page checksum verification during backup: hot backups under pgbench
//! report no false alarm; a page corrupted on disk is named by the backup
//! (stderr, manifest, `info`), in a full and in an incremental backup, and
//! the backup is kept.

mod support;

use std::os::unix::fs::FileExt;

use serde_json::Value;
use support::*;

/// The files of a manifest that list checksum errors, with their pages.
fn checksum_errors(manifest: &Value) -> Vec<(String, Vec<u64>)> {
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.get("checksum-errors").is_some())
        .map(|f| {
            let pages = f["checksum-errors"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
            (f["path"].as_str().unwrap().to_owned(), pages)
        })
        .collect()
}

/// `info --output json`'s backups of stanza demo, by label.
fn info_backups(pk: &Pgkeep) -> Vec<Value> {
    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    info[0]["backups"].as_array().unwrap().clone()
}

fn info_of<'a>(backups: &'a [Value], label: &str) -> &'a Value {
    backups.iter().find(|b| b["label"] == label).unwrap_or_else(|| panic!("{label} not in info: {backups:?}"))
}

/// Runs a backup that must succeed; returns its label and stderr.
fn backup(pk: &Pgkeep, args: &[&str]) -> (String, String) {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    let r = pk.run(&all);
    assert!(r.status.success(), "backup {args:?} failed ({}):\nstdout: {}\nstderr: {}", r.status, r.stdout, r.stderr);
    (r.stdout.trim().to_owned(), r.stderr)
}

#[test]
fn hot_backups_under_pgbench_raise_no_false_alarm() {
    let (_dir, repo, pg, pk) = local_stanza("checksums-hot");
    // Small shared buffers: pgbench's updates evict dirty pages all the
    // time, so relation files are written while the backup reads them.
    pg.psql("alter system set shared_buffers = '16MB'");
    pg.stop_clean();
    pg.start();
    pg.pgbench_init(10);

    let bench = pg.pgbench_background(20, 4);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (full, full_err) = backup(&pk, &["--type", "full"]);
    let (incr, incr_err) = backup(&pk, &["--type", "incr"]);
    bench.wait_ok();

    for (label, stderr) in [(&full, &full_err), (&incr, &incr_err)] {
        assert!(!stderr.contains("WARNING"), "backup {label} warned under pgbench:\n{stderr}");
        let manifest = read_manifest(&repo, label);
        assert_eq!(manifest["page-checksums"], true, "backup {label} should have verified pages");
        assert_eq!(checksum_errors(&manifest), vec![], "false alarms in backup {label}");
    }
    let backups = info_backups(&pk);
    for label in [&full, &incr] {
        let b = info_of(&backups, label);
        assert_eq!((&b["page-checksums"], &b["checksum-errors"]), (&Value::Bool(true), &Value::from(0)), "{b}");
        assert!(b.get("checksum-error-files").is_none(), "{b}");
    }
}

#[test]
fn a_corrupt_page_is_reported_and_the_backup_kept() {
    let (dir, repo, pg, pk) = local_stanza("checksums-corrupt");
    pg.psql(
        "create table victim (id int, payload text) with (autovacuum_enabled = false); \
         insert into victim select g, repeat(md5(g::text), 4) from generate_series(1, 2000) g",
    );
    pg.psql("vacuum (freeze, analyze) victim");
    let rel = pg.psql("select pg_relation_filepath('victim')");
    let pages: u64 = pg.psql("select pg_relation_size('victim') / 8192").parse().unwrap();
    assert!(pages > 8, "victim has {pages} pages");
    let (clean, clean_err) = backup(&pk, &["--type", "full"]);
    assert!(!clean_err.contains("WARNING"), "{clean_err}");

    // Corrupt eight bytes in the middle of page 3 (its tuples, not its
    // header) while the server is down, then start it without reading
    // the table: the damage is only on disk.
    pg.psql("checkpoint");
    pg.stop_clean();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(pg.addr.data.join(&rel)).unwrap();
    let at = 3 * 8192 + 4000;
    let mut bytes = [0u8; 8];
    file.read_exact_at(&mut bytes, at).unwrap();
    bytes.iter_mut().for_each(|b| *b ^= 0x5a);
    file.write_all_at(&bytes, at).unwrap();
    file.sync_all().unwrap();
    drop(file);
    pg.start();

    // An incremental backup does not store the page (its LSN is older than
    // the prior backup), but reads and checks it; a full one too.
    let (incr, incr_err) = backup(&pk, &["--type", "incr"]);
    let (full, full_err) = backup(&pk, &["--type", "full"]);
    let expected_line = format!("pgkeep: WARNING: {rel}: 1 page fails its checksum (page 3); the backup is kept");
    for (label, stderr) in [(&incr, &incr_err), (&full, &full_err)] {
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARNING")).collect();
        assert_eq!(warnings, vec![expected_line.as_str()], "backup {label} stderr:\n{stderr}");
        let manifest = read_manifest(&repo, label);
        assert_eq!(checksum_errors(&manifest), vec![(rel.clone(), vec![3])], "backup {label}");
    }
    let incr_entry = read_manifest(&repo, &incr)["files"].as_array().unwrap().iter().find(|f| f["path"] == rel.as_str()).unwrap().clone();
    assert_eq!(incr_entry["delta"], true, "the incr reads {rel} as a delta: {incr_entry}");
    assert!(incr_entry["key"].is_null(), "no page of {rel} changed since the prior backup: {incr_entry}");
    assert_eq!(checksum_errors(&read_manifest(&repo, &clean)), vec![]);

    let backups = info_backups(&pk);
    assert_eq!(info_of(&backups, &clean)["checksum-errors"], 0);
    for label in [&incr, &full] {
        let b = info_of(&backups, label);
        assert_eq!(b["checksum-errors"], 1, "{b}");
        assert_eq!(b["checksum-error-files"], serde_json::json!([{"path": rel, "pages": 1}]), "{b}");
    }
    let text = pk.ok(&["info"]);
    assert!(text.contains(&format!("page checksums: 1 page FAIL, in {rel} (1 page)")), "info:\n{text}");
    assert!(text.contains("page checksums: verified, no errors"), "info:\n{text}");

    // A restore drill proves the clean backup and catches the damaged one;
    // neither leaves its scratch copy or archives anything of its own.
    let scratch = dir.join("drill");
    let out = pk.ok(&["verify", "--restore", "--set", &clean, "--scratch", scratch.to_str().unwrap()]);
    assert!(out.contains(&format!("backup {clean} of repo 1")) && out.contains("clean"), "{out}");
    assert!(!scratch.exists(), "the drill's scratch copy is removed");
    let msg = pk.fails(&["verify", "--restore", "--set", &full]);
    assert!(msg.contains(&full) && msg.contains("pg_amcheck found damage"), "{msg}");
    let archived: Vec<String> = snapshot(&repo.path().join("demo/archive"))
        .into_keys()
        .map(|p| p.display().to_string())
        .filter(|p| p.contains(".history"))
        .collect();
    assert!(archived.is_empty(), "a drill's promoted copy must not archive: {archived:?}");

    // PostgreSQL agrees: the same block of the same file fails its checksum.
    pg.stop_clean();
    let r = run(
        as_postgres(pg_tool("pg_checksums"), dir.path()).arg("--check").arg("-D").arg(&pg.addr.data),
        std::time::Duration::from_secs(120),
    );
    assert!(!r.status.success(), "pg_checksums found no error:\n{}", r.stdout);
    let bad: Vec<&str> = r.stderr.lines().filter(|l| l.contains("checksum verification failed")).collect();
    assert_eq!(bad.len(), 1, "pg_checksums:\n{}", r.stderr);
    assert!(bad[0].contains(&format!("{rel}\", block 3:")), "pg_checksums: {}", bad[0]);
}
