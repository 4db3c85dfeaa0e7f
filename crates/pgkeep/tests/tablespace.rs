//! Tablespaces: a backup copies the files behind `pg_tblspc/<oid>`, and a
//! restore recreates the link, at the original location or where
//! `--tablespace-map` says. Restoring over the live source's tablespace is
//! refused.

mod support;

use support::*;

#[test]
fn tablespace_is_backed_up_and_restored_to_a_mapped_location() {
    let (dir, repo, pg, pk) = local_stanza("tablespace");
    let ts_source = dir.mkdir("ts-source");
    pg.psql(&format!("create tablespace ts location '{}'", ts_source.display()));
    pg.psql("create table t (id int primary key, v text) tablespace ts");
    pg.psql("insert into t select g, md5(g::text) from generate_series(1, 20000) g");
    pg.psql("create index t_v on t (v) tablespace ts");
    let oid = pg.psql("select oid from pg_tablespace where spcname = 'ts'");

    let label = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    assert!(is_full_label(&label), "{label:?}");
    let stored = repo.path().join("demo/backup").join(&label).join("pg_data/pg_tblspc").join(&oid);
    assert!(stored.is_dir(), "no tablespace files stored under {}", stored.display());

    pg.psql("insert into t select g, md5(g::text) from generate_series(20001, 25000) g");
    let last = pg.switch_wal();
    pg.wait_archived(&last);
    let expected = pg.dump();
    assert!(expected.contains("default_tablespace = ts"), "the dump does not show the tablespace");

    // The tablespace's original location is the live source's: refused.
    let target = dir.join("restored");
    let msg = pk.fails(&["restore", "--pg-data", target.to_str().unwrap()]);
    assert!(msg.contains("not empty") && msg.contains("ts-source"), "{msg}");
    assert_absent_or_empty(&target);

    let ts_restored = dir.join("ts-restored");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--tablespace-map", &format!("ts={}", ts_restored.display())]);
    let link = std::fs::read_link(target.join("pg_tblspc").join(&oid)).expect("pg_tblspc link");
    assert_eq!(link, ts_restored);

    let restored = Cluster::start_restored(&dir, &target);
    assert_eq!(
        restored.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts'"),
        ts_restored.display().to_string()
    );
    assert_eq!(restored.count("t"), 25000);
    assert_same_dump("restore with a mapped tablespace", &expected, &restored.dump());
    restored.amcheck();
}
