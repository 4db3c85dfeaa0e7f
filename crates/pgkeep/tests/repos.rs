//! Two repositories at once, a local one and an S3 one: WAL reaches both,
//! a backup goes where `--repo` says, `info` shows each backup's
//! repository, restore and archive-get use the repository that has what
//! they need, a repository that stops answering fails archive-push
//! without keeping the WAL from the other, and expire and verify work per
//! repository.

mod support;

use serde_json::Value;
use support::*;

#[test]
fn two_repositories_local_and_s3() {
    let dir = TestDir::new("repos");
    let moto = Moto::start("pgkeep-repos");
    let local = Repo::local(&dir, "repo1");
    let s3 = moto.repo("two");
    let pk = Pgkeep::new(&dir, "demo", "demo");
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    pk.write_config(&pg.addr, &local);
    let text = std::fs::read_to_string(&pk.config).unwrap();
    pk.write_raw_config(&format!("{text}\n{}", s3.toml()));
    pk.ok(&["stanza-create"]);
    pg.pgbench_init(2);

    let in_repo1 = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    pg.pgbench(1, 2);
    let expected = pg.dump();
    let in_repo2 = pk.ok(&["backup", "--type", "full", "--repo", "2"]).trim().to_owned();
    let seg = {
        pg.psql("create table marker as select 1 as x");
        pg.switch_wal()
    };
    pg.wait_archived(&seg);

    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let where_: Vec<(String, u64)> = info[0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["label"].as_str().unwrap().to_owned(), b["repo"].as_u64().unwrap()))
        .collect();
    assert!(where_.contains(&(in_repo1.clone(), 1)) && where_.contains(&(in_repo2.clone(), 2)), "{info}");

    // The WAL is in both: each verifies whole, with the same WAL files.
    let wal_files = |repo: &str| -> u64 {
        let r = pk.run(&["verify", "--repo", repo, "--output", "json"]);
        assert!(r.status.success(), "verify --repo {repo}: {}{}", r.stdout, r.stderr);
        serde_json::from_str::<Value>(&r.stdout).unwrap()["wal"]["files"].as_u64().unwrap()
    };
    let (w1, w2) = (wal_files("1"), wal_files("2"));
    assert!(w1 > 0 && w2 >= w1 - 1, "repo 1 has {w1} WAL files, repo 2 {w2}");

    // archive-get falls back to repo 2 when repo 1 lacks a file.
    let archived: Vec<std::path::PathBuf> = snapshot(&local.path().join("demo/archive"))
        .into_keys()
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&seg))
        .collect();
    assert_eq!(archived.len(), 1, "{seg} in repo 1: {archived:?}");
    std::fs::remove_file(local.path().join("demo/archive").join(&archived[0])).unwrap();
    let got = dir.join("got");
    pk.ok(&["archive-get", &seg, got.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&got).unwrap().len(), 16 << 20);

    // A repository that stops answering fails the push, named, and the
    // other still gets the file: PostgreSQL retries, nothing is dropped.
    let wal_dir = dir.mkdir("wal");
    let file = wal_dir.join(&seg);
    std::fs::copy(&got, &file).unwrap();
    // Copied by root from a file pgkeep wrote 0640: let postgres read it.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    moto.freeze();
    let msg = pk.fails(&["archive-push", file.to_str().unwrap(), "--repo", "2", "--io-timeout", "3"]);
    moto.thaw();
    assert!(msg.contains("archived in repo 1 but not in repo 2"), "{msg}");
    let back = snapshot(&local.path().join("demo/archive")).into_keys().any(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&seg));
    assert!(back, "{seg} reached repo 1 although repo 2 was down");
    pk.ok(&["archive-push", file.to_str().unwrap()]);

    // With repo 1's backup gone, restore finds the one in repo 2.
    pk.ok(&["expire", "--set", &in_repo1, "--repo", "1"]);
    let target = dir.join("restored");
    let out = pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &in_repo2, "--target-immediate"]);
    assert!(out.contains("from repo 2"), "{out}");
    let restored = Cluster::start_restored(&dir, &target);
    assert_same_dump("restore from repo 2", &expected, &restored.dump());
    restored.amcheck();
}

/// Four repositories: two local directories, S3 (moto) and Azure
/// (Azurite). Each gets its own backup; `info` reports every repository on
/// its own (one that stops answering is shown as an error while the
/// others are listed); `verify` and `expire` work on every repository
/// unless `--repo` names one; a backup restores from the Azure one.
#[test]
fn four_repositories_each_reported_verified_and_expired() {
    let dir = TestDir::new("repos4");
    let moto = Moto::start("pgkeep-repos4");
    let azurite = Azurite::start("pgkeep-repos4");
    let repos = [Repo::local(&dir, "repo1"), Repo::local(&dir, "repo2"), moto.repo("three"), azurite.repo("four")];
    let pk = Pgkeep::new(&dir, "demo", "demo").with_env(repos[3].env());
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    pk.write_config(&pg.addr, &repos[0]);
    let text = std::fs::read_to_string(&pk.config).unwrap();
    let s3 = format!("{}io-timeout = 2\n", repos[2].toml());
    pk.write_raw_config(&format!("{text}\n{}\n{s3}\n{}", repos[1].toml(), repos[3].toml()));
    let created = pk.ok(&["stanza-create"]);
    assert_eq!(created.matches("created in repo").count(), 4, "{created}");
    pg.pgbench_init(1);

    let mut labels = Vec::new();
    for n in 1..=4 {
        pg.pgbench(1, 2);
        labels.push(pk.ok(&["backup", "--type", "full", "--repo", &n.to_string()]).trim().to_owned());
    }
    let expected = pg.dump();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);

    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let per_repo = info[0]["repos"].as_array().unwrap_or_else(|| panic!("no repos in {info}"));
    assert_eq!(per_repo.len(), 4, "{info}");
    for (i, r) in per_repo.iter().enumerate() {
        assert_eq!(r["repo"].as_u64(), Some(i as u64 + 1), "{r}");
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["backups"].as_u64(), Some(1), "{r}");
        assert!(r["archive"]["max"].as_str().is_some_and(|m| m >= seg.as_str()), "repo {} lacks {seg}: {r}", i + 1);
        assert!(r["unfinished"].as_array().unwrap().is_empty() && r.get("running").is_none(), "{r}");
    }
    assert_eq!(info[0]["backups"].as_array().unwrap().len(), 4, "{info}");

    // verify with no --repo checks all four.
    let r = pk.run(&["verify", "--output", "json"]);
    assert!(r.status.success(), "{}{}", r.stdout, r.stderr);
    let reports: Value = serde_json::from_str(&r.stdout).unwrap();
    let checked: Vec<u64> = reports.as_array().unwrap().iter().map(|r| r["repo"].as_u64().unwrap()).collect();
    assert_eq!(checked, [1, 2, 3, 4]);
    assert!(reports.as_array().unwrap().iter().all(|r| r["ok"] == true && r["backups"].as_array().unwrap().len() == 1), "{reports}");

    // S3 stops answering: info still reports the other three, and says
    // what is wrong with repo 3; verify fails naming it.
    moto.freeze();
    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let status: Vec<&str> = info[0]["repos"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "ok", "error", "ok"], "{info}");
    assert!(info[0]["repos"][2]["error"].as_str().is_some_and(|e| e.contains("repo") || e.contains("s3://")), "{info}");
    assert_eq!(info[0]["backups"].as_array().unwrap().len(), 3, "{info}");
    let msg = pk.fails(&["verify"]);
    assert!(msg.contains("repo 3"), "{msg}");
    moto.thaw();

    // expire --set with no --repo finds the repository holding the backup.
    let out = pk.run(&["expire", "--set", &labels[1]]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("in repo 2"), "{}", out.stderr);
    let info: Value = serde_json::from_str(&pk.ok(&["info", "--output", "json"])).unwrap();
    let counts: Vec<u64> = info[0]["repos"].as_array().unwrap().iter().map(|r| r["backups"].as_u64().unwrap()).collect();
    assert_eq!(counts, [1, 0, 1, 1], "{info}");

    // The Azure repository's backup restores.
    let target = dir.join("restored");
    let out = pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &labels[3]]);
    assert!(out.contains("from repo 4"), "{out}");
    let restored = Cluster::start_restored_with(&dir, &target, &pk);
    assert_same_dump("restore from repo 4 (Azure)", &expected, &restored.dump());
    restored.amcheck();
}
