//! Azure Blob Storage end to end, on Azurite: a stanza on az://, WAL
//! archived by PostgreSQL's `archive_command`, a full and an incremental
//! backup around pgbench writes, a restore to the end of the archive that
//! dumps identically and passes pg_amcheck, and a clean `verify`. The
//! account and key are in the environment of pgkeep and of the PostgreSQL
//! servers that run it, as on a production host; the endpoint is in the
//! config. Then the mistakes a user makes: a container that does not
//! exist, no account, an endpoint and the emulator switch both set.

mod support;

use serde_json::Value;
use support::*;

#[test]
fn azure_repository_archives_backs_up_and_restores_exactly() {
    let azurite = Azurite::start("pgkeep-e2e");
    let dir = TestDir::new("azure");
    let (pg, pk) = cluster_with_config(&dir, "demo", &azurite.repo("ci/azure"));
    pk.ok(&["stanza-create"]);
    // check switches WAL and waits until archive_command has stored it.
    pk.ok(&["check"]);
    pg.pgbench_init(2);

    let full = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    assert!(is_full_label(&full), "backup printed {full:?}");
    pg.pgbench(5, 2);
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();
    assert!(incr.starts_with(&format!("{full}_")) && incr.ends_with('I'), "incr label {incr} should extend {full}");

    // Writes after the incr reach the restore through the archive only.
    pg.pgbench(2, 2);
    pg.psql("create table after_incr as select g from generate_series(1, 1000) g");
    let last = pg.switch_wal();
    pg.wait_archived(&last);
    let expected = pg.dump();

    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let labels: Vec<&str> = info[0]["backups"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap()).collect();
    assert_eq!(labels, [full.as_str(), incr.as_str()], "{info}");
    assert!(info[0]["archive"]["max"].as_str().is_some_and(|m| m >= last.as_str()), "archive ends before {last}: {info}");

    let r = pk.run(&["verify", "--repo", "1", "--output", "json"]);
    assert!(r.status.success(), "verify of the Azure repository failed:\n{}\n{}", r.stdout, r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(report["wal"]["files"].as_u64().is_some_and(|n| n >= 3), "verify saw too few WAL files: {report}");
    assert_eq!(report["wal"]["gaps"].as_array().map(Vec::len), Some(0), "{report}");

    let target = dir.join("restored");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap()]);
    // Its restore_command runs pgkeep with the account in its environment.
    let restored = Cluster::start_restored_with(&dir, &target, &pk);
    assert_eq!(restored.count("after_incr"), 1000);
    assert_same_dump("restore from Azure", &expected, &restored.dump());
    restored.amcheck();
    drop(azurite);
}

#[test]
fn azure_mistakes_fail_in_one_line_naming_the_repository() {
    let azurite = Azurite::start("exists");
    let dir = TestDir::new("azure-bad");
    let missing = Repo::Azure { endpoint: azurite.endpoint.clone(), container: "no-such-container".into(), prefix: "ci".into() };
    let (_pg, pk) = cluster_with_config(&dir, "demo", &missing);

    // A container that does not exist: named, with what to do.
    let msg = pk.fails(&["stanza-create"]);
    assert!(msg.contains("az://no-such-container/ci") && msg.contains("does not exist") && msg.contains("create it"), "{msg}");
    let msg = pk.fails(&["backup", "--type", "full"]);
    assert!(msg.contains("az://no-such-container/ci"), "{msg}");

    // The same through the emulator switch instead of an endpoint, which
    // proves that switch reaches Azurite: then the existing container works.
    let emulator =
        vec![("AZURE_STORAGE_USE_EMULATOR".to_owned(), "true".to_owned()), ("AZURITE_BLOB_STORAGE_URL".to_owned(), azurite.url.clone())];
    let config = std::fs::read_to_string(&pk.config).unwrap();
    let without_endpoint: String = config.lines().filter(|l| !l.starts_with("endpoint")).map(|l| format!("{l}\n")).collect();
    let emu = Pgkeep::new(&dir, "emulator", "demo").with_env(emulator.clone());
    emu.write_raw_config(&without_endpoint);
    let msg = emu.fails(&["stanza-create"]);
    assert!(msg.contains("az://no-such-container/ci") && msg.contains("does not exist"), "{msg}");
    emu.write_raw_config(&without_endpoint.replace("no-such-container", "exists"));
    emu.ok(&["stanza-create"]);
    assert!(emu.ok(&["info"]).contains("demo"));

    // No account at all: say which variable to set.
    let no_account = Pgkeep::new(&dir, "demo", "demo");
    let msg = no_account.fails(&["info"]);
    assert!(msg.contains("az://no-such-container/ci") && msg.contains("AZURE_STORAGE_ACCOUNT_NAME"), "{msg}");

    // An endpoint and the emulator switch: which one is meant?
    let both = Pgkeep::new(&dir, "demo", "demo").with_env(emulator);
    let msg = both.fails(&["info"]);
    assert!(msg.contains("endpoint") && msg.contains("AZURE_STORAGE_USE_EMULATOR"), "{msg}");
}
