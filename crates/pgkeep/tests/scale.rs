//! Memory does not grow with the number of files. A cluster's database
//! directory gets 200,000 more files, and the peak resident set size of
//! each pgkeep command that reads or writes a backup's file list (full
//! and incremental backup, restore, verify, info, expire) is measured from
//! the process itself (`wait4(2)`), beside the same commands on the
//! cluster as initdb made it (about 1,000 files).
//!
//! The added files are empty relation files PostgreSQL does not know
//! (orphans, as a CREATE TABLE that crashed leaves behind): a backup
//! copies every file of a database directory as it finds it, PostgreSQL
//! ignores them, and creating them takes seconds where 67,000 tables would
//! take minutes. What is measured is pgkeep's cost per file, which is the
//! same for a table's files.
//!
//! The bound, [`GROWTH_PER_FILE`]: a command may grow by at most 100 bytes
//! per file over its peak on the small cluster (20 MB at 200,000 files).
//! What a streamed command keeps per file is the largest directory's
//! names while the walk is in it (about 20 bytes a name) and nothing else
//! (the lists are read and written as streams, in bounded windows). The
//! commands before streaming grew by 1,000 to 2,800 bytes per file
//! (`bench/scale`, 2026-12-01): this fails on any of them.

mod support;

use support::*;

/// Files added to the database directory.
const FILES: u64 = 200_000;
/// How much a command's peak RSS may grow per file added, in bytes.
const GROWTH_PER_FILE: u64 = 100;

#[test]
fn memory_stays_flat_from_a_thousand_files_to_200000() {
    let (dir, _repo, pg, pk) = local_stanza("scale");
    pg.psql("create table t (id int primary key, v text)");
    pg.psql("insert into t select g, md5(g::text) from generate_series(1, 10000) g");
    let db = pg.psql("select oid from pg_database where datname = 'postgres'");
    let base = pg.addr.data.join("base").join(&db);

    let measure = |what: &str| -> Vec<(&'static str, u64)> {
        let restored = dir.join(&format!("restored-{what}"));
        let mut peaks = Vec::new();
        peaks.push(("full backup", pk.ok_measured(&["backup", "--type", "full"]).1));
        pg.psql("update t set v = v || 'x' where id % 100 = 0");
        peaks.push(("incr backup", pk.ok_measured(&["backup", "--type", "incr"]).1));
        peaks.push(("restore", pk.ok_measured(&["restore", "--pg-data", restored.to_str().unwrap()]).1));
        peaks.push(("verify", pk.ok_measured(&["verify"]).1));
        peaks.push(("info", pk.ok_measured(&["info", "--output", "json"]).1));
        peaks
    };
    let small = measure("small");

    // The orphans: empty main forks under relfilenodes far above any the
    // cluster gives out here.
    let added = std::time::Instant::now();
    for i in 0..FILES {
        std::fs::File::create(base.join((3_000_000_000 + i).to_string())).unwrap();
    }
    run_ok(std::process::Command::new("chown").arg("-R").arg("postgres:postgres").arg(&base), std::time::Duration::from_secs(300));
    eprintln!("added {FILES} files in {:.1?}", added.elapsed());
    pg.psql("checkpoint");
    let large = measure("large");
    let expected = pg.dump();

    eprintln!("peak RSS, KiB:  ~1,000 files   +{FILES} files");
    for ((what, s), (_, l)) in small.iter().zip(&large) {
        eprintln!("{what:>12}  {s:>14}  {l:>14}");
    }
    let allowed = FILES * GROWTH_PER_FILE / 1024;
    for ((what, s), (_, l)) in small.iter().zip(&large) {
        assert!(
            l.saturating_sub(*s) <= allowed,
            "{what}: peak RSS grew from {s} KiB to {l} KiB with {FILES} more files, more than {GROWTH_PER_FILE} bytes a file"
        );
    }

    // What was restored is the cluster, orphans included.
    let restored = dir.join("restored-large");
    let orphans = std::fs::read_dir(restored.join("base").join(&db))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().parse::<u64>().is_ok_and(|n| n >= 3_000_000_000))
        .count() as u64;
    assert_eq!(orphans, FILES, "files restored");
    let back = Cluster::start_restored(&dir, &restored);
    assert_same_dump("restore of 200,000 more files", &expected, &back.dump());
    back.amcheck();
}
