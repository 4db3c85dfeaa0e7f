//! Timelines: a restored cluster that promotes and keeps archiving into the
//! same stanza starts timeline 2 (history file and partial segment
//! archived); a later restore follows the newest timeline by default and
//! the old one with `--target-timeline 1`.

mod support;

use support::*;

#[test]
fn restore_follows_the_latest_timeline_or_the_one_asked_for() {
    let (dir, repo, pg, pk) = local_stanza("timeline");
    pg.psql("create table marks (id int primary key, name text not null)");
    pg.psql("insert into marks values (1, 'a')");
    let label = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    pg.psql("insert into marks values (2, 'b')");
    let last = pg.switch_wal();
    pg.wait_archived(&last);
    drop(pg);

    // The restored copy becomes the primary: timeline 2, archived.
    let first = dir.join("first");
    pk.ok(&["restore", "--pg-data", first.to_str().unwrap()]);
    let promoted = Cluster::start_restored_archiving(&dir, &first);
    assert_eq!(promoted.psql("select timeline_id from pg_control_checkpoint()"), "2");
    promoted.psql("insert into marks values (3, 'c')");
    let tl2 = promoted.switch_wal();
    assert!(tl2.starts_with("00000002"), "{tl2} is not on timeline 2");
    promoted.wait_archived(&tl2);
    let dump_tl2 = promoted.dump();
    drop(promoted);
    let history = std::fs::read_dir(repo.path().join("demo/archive/history")).expect("archived history files").count();
    assert_eq!(history, 1, "00000002.history should be archived once");

    let marks_after = |args: &[&str], name: &str| {
        let target = dir.join(name);
        let mut all = vec!["restore", "--pg-data", target.to_str().unwrap(), "--set", label.as_str()];
        all.extend_from_slice(args);
        pk.ok(&all);
        let c = Cluster::start_restored(&dir, &target);
        let marks = c.psql("select string_agg(name, ',' order by id) from marks");
        let dump = c.dump();
        c.amcheck();
        (marks, dump)
    };

    let (marks, dump) = marks_after(&[], "latest");
    assert_eq!(marks, "a,b,c", "the default follows the newest timeline");
    assert_same_dump("restore along timeline 2", &dump_tl2, &dump);

    let (marks, _) = marks_after(&["--target-timeline", "1"], "tl1");
    assert_eq!(marks, "a,b", "--target-timeline 1 stays on the old timeline");
}
