//! `stanza-delete`: refused in one line while the cluster runs and
//! archives into the stanza; once it is stopped, removes the stanza's
//! backups, WAL and metadata and nothing of another stanza in the same
//! repository; the stanza can then be created again.

mod support;

use support::*;

/// Files under `dir` (recursively), directories left out.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    snapshot(dir).into_keys().collect()
}

#[test]
fn a_stanza_is_deleted_only_when_nothing_archives_into_it_and_its_neighbour_stays() {
    let (dir, repo, pg, pk) = local_stanza("stanza-delete");
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    pk.ok(&["backup", "--type", "full"]);
    pk.ok(&["backup"]);

    // A second stanza in the same repository, of another cluster.
    let other_pk = Pgkeep::new(&dir, "other", "other").with_env(repo.env());
    let other = Cluster::new(&dir, "other-data", Some(&other_pk));
    other_pk.write_config(&other.addr, &repo);
    other_pk.ok(&["stanza-create"]);
    other_pk.ok(&["backup", "--type", "full"]);
    other.wait_archiver_idle();
    let neighbour = snapshot(&repo.path().join("other"));

    // Running with archive_mode = on: refused, nothing removed.
    let before = snapshot(&repo.path().join("demo"));
    let line = pk.fails(&["stanza-delete"]);
    assert!(line.contains("runs with archive_mode = on") && line.contains("stop it or turn archiving off"), "{line}");
    assert!(line.contains("--force"), "the CLI names its flag: {line}");
    assert!(before == snapshot(&repo.path().join("demo")), "a refused stanza-delete changed the stanza");

    // Stopped: deleted, the neighbour untouched.
    pg.stop_clean();
    let out = pk.ok(&["stanza-delete"]);
    assert!(out.contains("stanza 'demo' deleted from repo 1: 2 backups"), "{out}");
    let left = files(&repo.path().join("demo"));
    assert!(left.is_empty(), "stanza-delete left {left:?}");
    assert!(neighbour == snapshot(&repo.path().join("other")), "stanza-delete touched another stanza");
    let line = pk.fails(&["backup"]);
    assert!(line.contains("stanza 'demo' does not exist in repo 1"), "{line}");
    other_pk.ok(&["check"]);

    // Created again for the same cluster, it works as new.
    pg.start();
    pk.ok(&["stanza-create"]);
    pk.ok(&["check"]);
    let label = pk.ok(&["backup"]).trim().to_owned();
    assert!(is_full_label(&label), "the first backup of a re-created stanza is full: {label}");

    // --force deletes while the cluster runs.
    let out = pk.ok(&["stanza-delete", "--force"]);
    assert!(out.contains("deleted from repo 1: 1 backups"), "{out}");
    assert!(files(&repo.path().join("demo")).iter().all(|p| p.to_string_lossy().contains("/archive/")), "only WAL pushed since may remain");
}
