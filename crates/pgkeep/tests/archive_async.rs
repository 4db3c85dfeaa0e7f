//! Asynchronous archiving (`archive-async = true`) to two repositories, a
//! local one and an S3 one (moto):
//!
//! - under pgbench writing as fast as it can, with the push worker killed
//!   (SIGKILL) three times along the way, PostgreSQL's archiver stays a few
//!   segments behind at most, both repositories hold every segment, and a
//!   point-in-time restore to the last second (through the prefetching
//!   `archive-get`) is identical to the source;
//! - a repository that stops answering does not hold up the other: WAL is
//!   acknowledged once the local repository has it, queued in the spool for
//!   the S3 one up to `archive-push-queue-max`, skipped past it (said in
//!   PostgreSQL's log), and delivered once S3 answers again; `verify` then
//!   names exactly the skipped segments as the gap in that repository.
//!
//! `PGKEEP_LOAD_SECONDS` sets how long pgbench writes (default 40).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Config: the stanza with asynchronous archiving into `spool`, then the
/// repositories.
fn write_async_config(pk: &Pgkeep, pg: &Cluster, spool: &std::path::Path, extra: &str, repos: &[String]) {
    let a = &pg.addr;
    pk.write_raw_config(&format!(
        "[stanza.{}]\npg-data = \"{}\"\npg-host = \"{}\"\npg-port = {}\narchive-async = true\nspool-path = \"{}\"\n{extra}\n{}",
        pk.stanza,
        a.data.display(),
        a.socket_dir.display(),
        a.port,
        spool.display(),
        repos.join("\n")
    ));
}

/// Segment number of a 24-hex-digit WAL name (16 MiB segments).
fn seg_no(name: &str) -> u64 {
    u64::from_str_radix(&name[8..16], 16).unwrap() * 256 + u64::from_str_radix(&name[16..24], 16).unwrap()
}

fn pids_of(pattern: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep").args(["-f", pattern]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

fn verify_json(pk: &Pgkeep, repo: &str) -> (bool, Value) {
    let r = pk.run(&["verify", "--repo", repo, "--output", "json"]);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("verify --repo {repo} gave no JSON ({e}): {}{}", r.stdout, r.stderr));
    (r.status.success(), v)
}

#[test]
fn async_archiving_keeps_up_under_load_and_restores_to_the_last_second() {
    let seconds: u32 = std::env::var("PGKEEP_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let dir = TestDir::new("archive-async");
    let moto = Moto::start("pgkeep-async");
    let local = Repo::local(&dir, "repo1");
    let spool = dir.mkdir("spool");
    let pk = Pgkeep::new(&dir, "demo", "demo");
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    write_async_config(&pk, &pg, &spool, "", &[local.toml(), moto.repo("two").toml()]);
    pk.ok(&["stanza-create"]);
    pg.pgbench_init(10);
    pk.ok(&["backup", "--type", "full"]);
    pk.ok(&["backup", "--type", "full", "--repo", "2"]);

    // The archiver's lag, sampled: segments between the one being written
    // and the last one archived.
    let stop = Arc::new(AtomicBool::new(false));
    let lags = Arc::new(Mutex::new(Vec::<u64>::new()));
    let sampler = {
        let (stop, lags) = (stop.clone(), lags.clone());
        let q = "select pg_walfile_name(pg_current_wal_lsn()), coalesce(last_archived_wal, '') from pg_stat_archiver";
        let psql = pg.psql_command(q);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let row = psql();
                if let Some((now, archived)) = row.split_once('|') {
                    if archived.len() == 24 {
                        lags.lock().unwrap().push(seg_no(now).saturating_sub(seg_no(archived)));
                    }
                }
                thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let before: Vec<u64> =
        pg.psql("select archived_count, failed_count from pg_stat_archiver").split('|').map(|v| v.parse().unwrap()).collect();
    let start = Instant::now();
    let load = pg.pgbench_background(seconds, 8);
    // A WAL switch every 2 s during the load as well: how much WAL pgbench
    // makes in the time depends on the machine (8 segments in 40 s on a
    // loaded CI machine), and the test needs files to archive.
    let loading = Arc::new(AtomicBool::new(true));
    let switcher = {
        let (loading, switch) = (loading.clone(), pg.psql_command("select pg_switch_wal()"));
        thread::spawn(move || {
            while loading.load(Ordering::Relaxed) {
                switch();
                thread::sleep(Duration::from_secs(2));
            }
        })
    };
    // Kill the push worker three times along the way: the next
    // archive-push starts another, and nothing is lost.
    let mut kills = 0;
    for k in 1..=3u32 {
        while start.elapsed() < Duration::from_secs(u64::from(seconds * k / 4)) {
            thread::sleep(Duration::from_millis(100));
        }
        for pid in pids_of("archive-push .*--worker") {
            if std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success() {
                kills += 1;
            }
        }
    }
    load.wait_ok();
    loading.store(false, Ordering::Relaxed);
    switcher.join().unwrap();
    let elapsed = start.elapsed().as_secs_f64();

    // The target: the last second, after the last write of the load.
    pg.psql("create table marker as select 1 as x");
    thread::sleep(Duration::from_millis(1100));
    let target = pg.psql("select to_char(clock_timestamp(), 'YYYY-MM-DD HH24:MI:SS.USOF')");
    let expected = pg.dump();
    thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into marker values (2)");
    let last = pg.switch_wal();
    pg.wait_archived(&last);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let after: Vec<u64> =
        pg.psql("select archived_count, failed_count from pg_stat_archiver").split('|').map(|v| v.parse().unwrap()).collect();
    let archived = after[0] - before[0];
    let lags = lags.lock().unwrap().clone();
    let max_lag = lags.iter().copied().max().unwrap_or(0);
    eprintln!(
        "load: {archived} files archived in {elapsed:.1} s ({:.1}/s) to two repositories, {} failed attempts, archiver lag max {max_lag} segments over {} samples, push worker killed {kills} times",
        archived as f64 / elapsed,
        after[1] - before[1],
        lags.len()
    );
    assert!(archived >= 10, "the load made only {archived} WAL files: the test proves nothing");
    assert!(kills >= 1, "no push worker was running to kill during the load");
    assert!(lags.len() >= 10, "too few lag samples: {lags:?}");
    assert!(max_lag <= 6, "the archiver fell {max_lag} segments behind (samples: {lags:?})");

    // Both repositories hold every segment, checked.
    for repo in ["1", "2"] {
        let (ok, v) = verify_json(&pk, repo);
        assert!(ok, "verify --repo {repo}: {v}");
        assert!(v["wal"]["files"].as_u64().unwrap() >= archived, "repo {repo}: {v}");
    }
    assert!(pids_of("archive-push .*--worker").len() <= 1, "more than one push worker");

    // Point-in-time restore to the last second, through archive-get's
    // prefetch.
    let restored_dir = dir.join("restored");
    pk.ok(&["restore", "--pg-data", restored_dir.to_str().unwrap(), "--target-time", &target]);
    let restored = Cluster::start_restored(&dir, &restored_dir);
    assert_eq!(restored.count("marker"), 1, "the restore went past its target");
    assert_same_dump("restore to the last second", &expected, &restored.dump());
    restored.amcheck();
    let log = std::fs::read_to_string(spool.join("demo/get.log")).unwrap_or_default();
    assert!(log.contains("started"), "archive-get never started its prefetcher:\n{log}");
}

#[test]
fn a_repository_that_stays_down_is_queued_then_skipped_past_the_limit() {
    let dir = TestDir::new("archive-queue");
    let moto = Moto::start("pgkeep-queue");
    let local = Repo::local(&dir, "repo1");
    let spool = dir.mkdir("spool");
    let pk = Pgkeep::new(&dir, "demo", "demo");
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    let s3 = format!("{}io-timeout = 2\n", moto.repo("two").toml());
    write_async_config(&pk, &pg, &spool, "archive-push-queue-max = \"48MiB\"", &[local.toml(), s3]);
    pk.ok(&["stanza-create"]);
    pg.pgbench_init(1);
    pk.ok(&["backup", "--type", "full", "--repo", "2"]);
    let segment = |i: u32| {
        pg.psql(&format!("create table t{i} as select {i} as x"));
        pg.switch_wal()
    };
    pg.wait_archived(&segment(0));

    // S3 stops answering: WAL keeps being acknowledged (repo 1 has it),
    // the first three segments are queued for repo 2, the next three are
    // not (48 MiB of queue), and PostgreSQL's log says so.
    moto.freeze();
    let down: Vec<String> = (1..=6).map(segment).collect();
    pg.wait_archived(&down[5]);
    let queue = spool.join("demo/queue/repo2");
    let queued: Vec<String> = {
        let mut q: Vec<String> = std::fs::read_dir(&queue).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        q.sort();
        q
    };
    assert_eq!(queued, down[..3].to_vec(), "queued for repo 2");
    // Each skipped segment is named, in PostgreSQL's log or (when it was
    // queued first and then made room for an older one) in the worker's.
    let log = std::fs::read_to_string(pg.log()).unwrap() + &std::fs::read_to_string(spool.join("demo/push.log")).unwrap();
    for name in &down[3..] {
        assert!(log.contains(&format!("{name} is NOT kept for repo 2")), "no log says {name} was skipped:\n{log}");
    }
    assert!(log.contains("is queued for it"), "PostgreSQL's log does not say WAL is queued for repo 2:\n{log}");
    let (ok, v) = verify_json(&pk, "1");
    assert!(ok, "repo 1 must hold every segment while repo 2 is down: {v}");

    // S3 answers again: the queue is delivered, new WAL reaches it too.
    moto.thaw();
    let start = Instant::now();
    while std::fs::read_dir(&queue).unwrap().next().is_some() {
        assert!(start.elapsed() < Duration::from_secs(120), "the queue for repo 2 was not delivered after S3 came back");
        thread::sleep(Duration::from_millis(200));
    }
    let after = segment(7);
    pg.wait_archived(&after);

    let (ok, v) = verify_json(&pk, "2");
    assert!(!ok, "verify must report repo 2's gap: {v}");
    let gaps = v["wal"]["gaps"].as_array().unwrap_or_else(|| panic!("no gaps in {v}"));
    assert_eq!(gaps.len(), 1, "{v}");
    assert_eq!((gaps[0]["from"].as_str().unwrap(), gaps[0]["to"].as_str().unwrap()), (down[3].as_str(), down[5].as_str()), "{v}");
    let (ok, v) = verify_json(&pk, "1");
    assert!(ok, "{v}");

    // The delivered segments come back whole from repo 2 alone.
    let only2 = Pgkeep::new(&dir, "only2", "demo");
    only2.write_raw_config(&format!("[stanza.demo]\npg-data = \"{}\"\n\n{}", pg.addr.data.display(), moto.repo("two").toml()));
    for name in down[..3].iter().chain([&after]) {
        let got = dir.join("got");
        only2.ok(&["archive-get", name, got.to_str().unwrap()]);
        assert_eq!(std::fs::metadata(&got).unwrap().len(), 16 << 20);
    }
}

/// The files of a spool queue directory, by name (none when it is absent).
fn queued_files(queue: &std::path::Path) -> Vec<String> {
    let mut q: Vec<String> = std::fs::read_dir(queue)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.ends_with(".tmp"))
        .collect();
    q.sort();
    q
}

/// Kills the processes matching a pattern when dropped: a failed test
/// leaves no push worker of its own behind.
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in pids_of(&self.0) {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// Issue 10: two local repositories, asynchronous archiving, pgbench
/// and bulk inserts writing all along. Repository 2 is made unwritable for
/// the postgres user (its directory chmod 000) until WAL is queued for it,
/// then writable again, three times. Each time, once PostgreSQL has
/// archived past the segment it was writing when repository 2 came back
/// (so every upload that started while it was down has ended), its queue
/// must drain to empty: an upload that started while it was down and
/// ended after it came back used to queue its file for a repository that
/// was up again, where nothing delivered it and the worker never went
/// idle. At the end the worker exits by itself, with no archive-push to
/// wake it, and repository 2 holds every segment.
///
/// Repository 1 compresses hard (gzip, level 9) and repository 2 stores
/// WAL as is: an upload (which compresses for both) lasts several times
/// as long as delivering one queued file (a copy), so uploads are in
/// flight whenever the queue runs empty, and the queue does drain while
/// the load goes on.
#[test]
fn a_repository_that_comes_back_under_load_gets_its_whole_queue_and_the_worker_goes_idle() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("archive-back");
    let (one, two) = (Repo::local(&dir, "repo1"), Repo::local(&dir, "repo2"));
    let zstd = "compress = \"zstd\"";
    let toml1 = one.toml().replace(zstd, "compress = \"gzip\"\ncompress-level = 9");
    let toml2 = two.toml().replace(zstd, "compress = \"none\"");
    let spool = dir.mkdir("spool");
    let pk = Pgkeep::new(&dir, "demo", "demo");
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    write_async_config(&pk, &pg, &spool, "", &[toml1, toml2]);
    pk.ok(&["stanza-create"]);
    pg.pgbench_init(5);
    let queue = spool.join("demo/queue/repo2");
    let push_log = spool.join("demo/push.log");
    let log = || std::fs::read_to_string(&push_log).unwrap_or_default();
    let worker = format!("{} .*archive-push .*--worker", dir.pgkeep_bin().display());
    let _workers = KillOnDrop(worker.clone());
    let mode = std::fs::metadata(two.path()).unwrap().permissions().mode() & 0o7777;
    let limit = Duration::from_secs(120);

    // pgbench, and beside it bulk inserts (about 10 MiB of WAL each, one
    // a second): several uploads run at any moment.
    let mut load = pg.pgbench_background(900, 4);
    pg.psql("create table filler (t text)");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let insert = pg.psql_command("insert into filler select repeat(md5(i::text), 16) from generate_series(1, 15000) i");
        let truncate = pg.psql_command("truncate filler");
        thread::spawn(move || {
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                insert();
                if i % 20 == 19 {
                    truncate();
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
    };
    for cycle in 1..=3usize {
        // Repository 2 fails: WAL is acknowledged (repo 1 has it) and
        // queued for repo 2.
        std::fs::set_permissions(two.path(), std::fs::Permissions::from_mode(0o000)).unwrap();
        let start = Instant::now();
        while queued_files(&queue).len() < 3 {
            assert!(load.running(), "pgbench ended before WAL was queued for repo 2");
            assert!(start.elapsed() < limit, "cycle {cycle}: no WAL queued for repo 2 while it was unwritable:\n{}", tail(&push_log, 20));
            thread::sleep(Duration::from_millis(100));
        }
        // It is writable again, with uploads still running.
        std::fs::set_permissions(two.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let start = Instant::now();
        while log().matches("repo 2 is up again").count() < cycle {
            assert!(
                start.elapsed() < limit,
                "cycle {cycle}: repo 2 is writable again but not back after {limit:?}; {} files queued for it; push.log:\n{}",
                queued_files(&queue).len(),
                tail(&push_log, 30)
            );
            thread::sleep(Duration::from_millis(100));
        }
        // Every upload that started while it was down is for a segment
        // before this one: once PostgreSQL has archived it, they have
        // all ended, and nothing may be left queued.
        let current = pg.current_segment();
        pg.wait_archived(&current);
        let start = Instant::now();
        while !queued_files(&queue).is_empty() {
            assert!(
                start.elapsed() < limit,
                "cycle {cycle}: repo 2 came back and {current} is archived, but {:?} are still queued for it after {limit:?}; push.log:\n{}",
                queued_files(&queue),
                tail(&push_log, 30)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(load.running(), "pgbench ended during the test: the uploads did not overlap repo 2's return");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    drop(load);
    pg.psql("insert into filler values ('last')");
    let last = pg.switch_wal();
    pg.wait_archived(&last);

    // Nothing new to archive: the queue is empty and the worker exits
    // on its own.
    let start = Instant::now();
    loop {
        let (left, running) = (queued_files(&queue), pids_of(&worker));
        if left.is_empty() && running.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "{limit:?} after the last archive-push, {left:?} are still queued for repo 2 and the push worker ({running:?}) has not gone idle; push.log:\n{}",
            tail(&push_log, 30)
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(log().ends_with("idle; stopping\n"), "the worker did not stop as idle:\n{}", tail(&push_log, 10));
    // How often an upload outlived an outage (each would have been
    // stranded): the test proves most when it is not zero.
    eprintln!("uploads that ended after repo 2 came back: {}", log().matches("came back while it was stored elsewhere").count());
    for repo in ["1", "2"] {
        let (ok, v) = verify_json(&pk, repo);
        assert!(ok, "repo {repo} must hold every segment: {v}");
        assert!(v["wal"]["files"].as_u64().unwrap() >= seg_no(&last), "repo {repo}: {v}");
    }
}
