//! Regression tests for issue 10: restores that finish without an error
//! but hold wrong data, a restore that a kill can leave startable, a killed
//! backup that blocks the stanza, and repositories readable by every
//! local user. One test per case of the issue (case 7, a lock race, is
//! covered by unit tests).
//!
//! What each test gave on the engine of commit af2060f (before the fixes):
//!
//! - case 1, `incr_after_delete_restores_a_correct_visibility_map`: FAILURE_1
//! - case 2, `incr_after_restoring_an_older_backup_in_place_follows_the_new_timeline`: FAILURE_2
//! - case 3, `incr_after_recreating_a_database_with_file_copy_restores_the_new_database`: FAILURE_3
//! - case 4, `incr_after_enabling_checksums_restores_pages_with_valid_checksums`: FAILURE_4
//! - case 5, `a_killed_restore_never_leaves_pg_control_without_a_complete_backup_label`: FAILURE_5
//! - case 6, `a_killed_backup_left_unreaped_does_not_block_the_next_backup`: FAILURE_6
//! - case 8, `repository_and_restored_files_are_private_under_umask_0022`: FAILURE_8

mod support;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// `restore --set label --target-immediate` into `dir/name`; returns the
/// directory.
fn restore_to(dir: &TestDir, pk: &Pgkeep, label: &str, name: &str) -> std::path::PathBuf {
    let target = dir.join(name);
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", label, "--target-immediate"]);
    target
}

/// pg_dump of `db` on a restored cluster, failing the test with pg_dump's
/// error (the restore finished "fine" but the data cannot be read).
fn restored_dump(c: &Cluster, db: &str, what: &str) -> String {
    c.try_dump_db(db).unwrap_or_else(|r| panic!("{what}: pg_dump -d {db} of the restored cluster failed: {}", r.stderr.trim()))
}

/// Issue 10, case 1: a delete clears visibility map bits without changing
/// the LSN of the map's page, so an incremental backup that copies only
/// pages newer than its prior keeps the old map, which says the pages of
/// the deleted rows are all visible and frozen.
#[test]
fn incr_after_delete_restores_a_correct_visibility_map() {
    let (dir, _repo, pg, pk) = local_stanza("holes-vm");
    pg.psql("create extension pg_visibility");
    pg.psql("create table v (id int primary key, p text) with (autovacuum_enabled = off)");
    pg.psql("insert into v select g, repeat('x', 100) from generate_series(1, 100000) g");
    pg.psql("vacuum (freeze, analyze) v");
    pg.psql("checkpoint");
    pk.ok(&["backup", "--type", "full"]);
    pg.psql("delete from v where id <= 50000");
    pg.psql("checkpoint");
    assert_eq!(pg.psql("select count(*) from pg_check_visible('v')"), "0", "the source's map is right");
    let expected = pg.dump();
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();

    let target = restore_to(&dir, &pk, &incr, "restored");
    let restored = Cluster::start_restored(&dir, &target);
    let not_visible = restored.psql("select count(*) from pg_check_visible('v')");
    let not_frozen = restored.psql("select count(*) from pg_check_frozen('v')");
    assert!(
        not_visible == "0" && not_frozen == "0",
        "restore of {incr}: pg_check_visible gave {not_visible} and pg_check_frozen gave {not_frozen} tuples \
         on pages the visibility map marks all-visible/all-frozen (both must be 0)"
    );
    assert_same_dump(&format!("restore of {incr}"), &expected, &restored_dump(&restored, "postgres", "restore of the incr"));
    restored.amcheck();
}

/// Issue 10, case 2: after an older full backup F is restored in place
/// and promoted, the new timeline writes pages at LSNs below the start of
/// the newest backup of the old timeline (I1). An incremental backup
/// built on I1 skips those pages: its restore mixes both timelines.
#[test]
fn incr_after_restoring_an_older_backup_in_place_follows_the_new_timeline() {
    let (dir, _repo, pg, pk) = local_stanza("holes-timeline");
    pg.psql("create table t (id int primary key, v text not null)");
    pg.psql("insert into t values (1, 'tl1')");
    pg.psql("checkpoint");
    let full = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    // About 70 MB of WAL on timeline 1 after F: I1 starts far beyond
    // everything timeline 2 writes below.
    pg.psql(
        "create table filler as select g as id, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) as s \
         from generate_series(1, 400000) g",
    );
    pg.psql("checkpoint");
    let i1 = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();
    pg.stop_clean();

    // F, restored over the cluster's own data directory, becomes the
    // primary on timeline 2, archiving into the same stanza.
    pk.ok(&["restore", "--force", "--set", &full, "--target-immediate"]);
    pg.start();
    pg.wait_promoted();
    assert_eq!(pg.psql("select timeline_id from pg_control_checkpoint()"), "2");
    pg.psql("update t set v = 'tl2'");
    pg.psql("checkpoint");
    let expected = pg.dump();
    let last = pk.ok(&["backup"]).trim().to_owned();

    let target = restore_to(&dir, &pk, &last, "restored");
    let restored = Cluster::start_restored(&dir, &target);
    let what = format!("restore of {last} (taken on timeline 2 after F={full} was restored in place; I1={i1})");
    assert_same_dump(&what, &expected, &restored_dump(&restored, "postgres", &what));
    restored.amcheck();
}

/// Issue 10, case 3: a database dropped and created again under the same
/// OID with `STRATEGY FILE_COPY` gets the template's files, whose pages
/// keep their old LSNs. An incremental backup that copies only pages newer
/// than its prior keeps the old database's catalog.
#[test]
fn incr_after_recreating_a_database_with_file_copy_restores_the_new_database() {
    let (dir, _repo, pg, pk) = local_stanza("holes-file-copy");
    pg.psql("create database tmpl");
    pg.psql_in("tmpl", "create table from_tmpl (id int primary key, s text not null)");
    pg.psql_in("tmpl", "insert into from_tmpl select g, 'template row ' || g from generate_series(1, 2000) g");
    pg.psql("create database app oid 50000");
    pg.psql_in("app", "create table old_app (k int primary key, note text not null, extra int)");
    pg.psql_in("app", "insert into old_app select g, 'old app row ' || g, g from generate_series(1, 3000) g");
    pg.psql("checkpoint");
    pk.ok(&["backup", "--type", "full"]);

    pg.psql("drop database app");
    pg.psql("create database app oid 50000 template tmpl strategy file_copy");
    pg.psql("checkpoint");
    let expected = pg.dump_db("app");
    assert!(expected.contains("from_tmpl") && !expected.contains("old_app"), "the source's app is a copy of tmpl");
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();

    let target = restore_to(&dir, &pk, &incr, "restored");
    let restored = Cluster::start_restored(&dir, &target);
    let tables = restored.try_psql_in("app", "select string_agg(relname, ',' order by relname) from pg_class where relkind = 'r' and relnamespace = 'public'::regnamespace");
    let what = format!("restore of {incr}: database app (tables: {})", tables.stdout.trim());
    assert_same_dump(&what, &expected, &restored_dump(&restored, "app", &what));
    restored.amcheck();
}

/// Issue 10, case 4: `pg_checksums --enable` rewrites every page with a
/// checksum but keeps its LSN and writes no WAL. An incremental backup
/// that copies only pages newer than its prior restores the old pages,
/// without checksums, under a pg_control that says checksums are on.
#[test]
fn incr_after_enabling_checksums_restores_pages_with_valid_checksums() {
    let dir = TestDir::new("holes-checksums");
    let repo = Repo::local(&dir, "repo");
    let pk = Pgkeep::new(&dir, "demo", "demo");
    let pg = Cluster::new_with_initdb(&dir, "demo-data", Some(&pk), &[]);
    pk.write_config(&pg.addr, &repo);
    pk.ok(&["stanza-create"]);
    assert_eq!(pg.psql("show data_checksums"), "off");
    pg.psql("create table c (id int primary key, s text not null)");
    pg.psql("insert into c select g, md5(g::text) from generate_series(1, 50000) g");
    pg.psql("vacuum (freeze, analyze)");
    pg.psql("checkpoint");
    pk.ok(&["backup", "--type", "full"]);

    pg.stop_clean();
    let r = pg.pg_checksums(&["--enable"]);
    assert!(r.status.success(), "pg_checksums --enable: {}{}", r.stdout, r.stderr);
    pg.start();
    assert_eq!(pg.psql("show data_checksums"), "on");
    let expected = pg.dump();
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();

    let target = restore_to(&dir, &pk, &incr, "restored");
    let restored = Cluster::start_recovery(&dir, &target);
    wait_promoted_failing_fast(&restored, &format!("restore of {incr}"));
    // Read every table and index of every kind in database postgres.
    let read_all = restored.try_psql_in(
        "postgres",
        "do $$ declare r record; n bigint; begin \
           for r in select oid::regclass as rel from pg_class where relkind in ('r', 'm', 't') loop \
             execute format('select count(*) from %s', r.rel) into n; \
           end loop; end $$",
    );
    assert!(read_all.status.success(), "restore of {incr}: reading every table failed: {}", read_all.stderr.trim());
    assert_same_dump(&format!("restore of {incr}"), &expected, &restored_dump(&restored, "postgres", "restore of the incr"));
    let (clean, report) = restored.try_amcheck();
    assert!(clean, "restore of {incr}: pg_amcheck found problems:\n{report}");
    restored.stop_clean();
    let check = restored.pg_checksums(&["--check"]);
    assert!(check.status.success(), "restore of {incr}: pg_checksums --check failed:\n{}{}", check.stdout, check.stderr);
}

/// Waits until `c` has recovered and promoted, failing at once (not
/// after the harness's five minutes) when connecting reports a damaged page.
fn wait_promoted_failing_fast(c: &Cluster, what: &str) {
    let start = Instant::now();
    loop {
        let r = c.try_psql_in("postgres", "select pg_is_in_recovery()");
        if r.status.success() && r.stdout.trim() == "f" {
            return;
        }
        let err = r.stderr.trim();
        assert!(!err.contains("invalid page"), "{what}: cannot connect to the restored cluster: {err}");
        assert!(start.elapsed() < Duration::from_secs(300), "{what}: not promoted: {err}\n{}", tail(&c.log_path(), 30));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 10, case 5: restore writes `global/pg_control` before
/// `backup_label`. Killed between the two, it leaves a directory that
/// PostgreSQL starts as if it were a crashed primary (or recovers from
/// the wrong checkpoint), never consistent. Whatever a kill leaves: where
/// `global/pg_control` exists, `backup_label` must exist and be whole.
#[test]
fn a_killed_restore_never_leaves_pg_control_without_a_complete_backup_label() {
    const SPREAD: u32 = 20;
    const WATCHED: u32 = 10;
    let (dir, repo, pg, pk) = local_stanza("holes-restore-kill");
    // Many small files: 2,000 one-row tables.
    pg.psql(
        "do $$ begin for i in 1..2000 loop \
           execute format('create table s%s (id int)', i); execute format('insert into s%s values (%s)', i, i); \
         end loop; end $$",
    );
    pg.psql("checkpoint");
    let label = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    let label_text = read_manifest(&repo, &label)["backup-label"].as_str().expect("the manifest's backup-label").to_owned();
    let args = |target: &std::path::Path| -> Vec<String> {
        ["restore", "--pg-data", target.to_str().unwrap(), "--set", &label, "--target-immediate", "--jobs", "1"]
            .map(String::from)
            .to_vec()
    };
    let start = Instant::now();
    let probe = dir.join("probe");
    pk.ok(&args(&probe).iter().map(String::as_str).collect::<Vec<_>>());
    let took = start.elapsed();
    std::fs::remove_dir_all(&probe).unwrap();

    // What a kill left in `target`: None when the invariant holds.
    let violation = |target: &std::path::Path| -> Option<String> {
        if !target.join("global/pg_control").exists() {
            return None;
        }
        match std::fs::read_to_string(target.join("backup_label")) {
            Ok(text) if text == label_text => None,
            Ok(text) => Some(format!("backup_label is incomplete ({} of {} bytes)", text.len(), label_text.len())),
            Err(e) => Some(format!("global/pg_control exists but backup_label does not ({e})")),
        }
    };
    let mut violations = Vec::new();
    let mut hit_window = 0;

    // Kills at points spread over a whole run.
    for i in 0..SPREAD {
        let target = dir.join(&format!("spread-{i}"));
        let a = args(&target);
        let mut p = pk.spawn(&a.iter().map(String::as_str).collect::<Vec<_>>());
        std::thread::sleep(took * (i + 1) / (SPREAD + 1));
        let killed = p.running();
        drop(p);
        if killed {
            if let Some(v) = violation(&target) {
                hit_window += 1;
                violations.push((target.clone(), format!("kill at {}/{} of a run: {v}", i + 1, SPREAD + 1)));
            }
        }
    }
    // Kills the moment global/pg_control appears (watched from outside,
    // no engine hook): the restore's last steps.
    for i in 0..WATCHED {
        let target = dir.join(&format!("watched-{i}"));
        let a = args(&target);
        let mut p = pk.spawn(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let control = target.join("global/pg_control");
        while p.running() && !control.exists() {
            std::hint::spin_loop();
        }
        let killed = p.running();
        drop(p);
        if killed {
            if let Some(v) = violation(&target) {
                hit_window += 1;
                violations.push((target.clone(), format!("kill as global/pg_control appeared: {v}")));
            }
        }
    }
    eprintln!("{hit_window} of {} kills left pg_control without a whole backup_label", SPREAD + WATCHED);
    if let Some((target, first)) = violations.first() {
        let starts = postgres_starts(&dir, target);
        panic!(
            "{} of {} killed restores left global/pg_control without a whole backup_label; first: {first}; \
             PostgreSQL {} that directory",
            violations.len(),
            SPREAD + WATCHED,
            if starts { "STARTS" } else { "refuses to start" }
        );
    }
}

/// Whether PostgreSQL starts on `data` (archiving off, its own port), then
/// stops it again.
fn postgres_starts(dir: &TestDir, data: &std::path::Path) -> bool {
    run_ok(Command::new("chown").arg("-R").arg("postgres:postgres").arg(data), Duration::from_secs(60));
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let opts = format!(
        "-c archive_mode=off -c port={} -c unix_socket_directories={} -c listen_addresses=",
        free_port(),
        dir.path().display()
    );
    let log = dir.join("starts.log");
    let r = run(
        as_postgres(pg_tool("pg_ctl"), dir.path()).arg("-D").arg(data).arg("-l").arg(&log).args(["-w", "-t", "60", "-o", &opts, "start"]),
        Duration::from_secs(120),
    );
    let _ = run(as_postgres(pg_tool("pg_ctl"), dir.path()).arg("-D").arg(data).args(["-m", "immediate", "-w", "stop"]), Duration::from_secs(60));
    eprintln!("pg_ctl start on the killed restore: {}\n{}", r.status, tail(&log, 15));
    r.status.success()
}

/// Issue 10, case 6: a backup killed with SIGKILL whose parent does not
/// reap it stays a zombie, and /proc/PID/comm of a zombie still says
/// `pgkeep`: the stanza lock's holder looks alive, and every later backup
/// is refused "wait for it to finish", forever.
#[test]
fn a_killed_backup_left_unreaped_does_not_block_the_next_backup() {
    let (_dir, repo, pg, pk) = local_stanza("holes-zombie");
    pg.pgbench_init(10);
    pg.psql("checkpoint");
    // A subreaper that never waits: the backup, started by a shell that
    // exits at once, is re-parented to it and left a zombie once killed.
    let script = r#"
import ctypes, subprocess, sys, time
if ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
out = subprocess.run(["sh", "-c", 'setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', "sh"] + sys.argv[1:],
                     stdout=subprocess.PIPE, check=True, text=True)
print(out.stdout.strip(), flush=True)
while True:
    time.sleep(3600)
"#;
    let mut reaper_cmd = Command::new("/usr/bin/python3");
    reaper_cmd.arg("-c").arg(script).args(pk.command_line(&["backup", "--type", "full", "--jobs", "1", "--compress-level", "19"]));
    reaper_cmd.current_dir(pk.cwd()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("PG")) {
            reaper_cmd.env_remove(k);
        }
    }
    let mut reaper = reaper_cmd.spawn().expect("start the subreaper");
    struct Reaper(std::process::Child);
    impl Drop for Reaper {
        fn drop(&mut self) {
            // Killing the subreaper hands its zombies to init, which reaps them.
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufReader::new(reaper.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let reaper = Reaper(reaper);
    let pid: u32 = line.trim().parse().unwrap_or_else(|_| panic!("the subreaper did not print a pid: {line:?}"));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim(),
        "pgkeep",
        "pid {pid} is the backup itself"
    );

    // Kill it while it runs, with the stanza lock taken.
    let start = Instant::now();
    while snapshot(&repo.path().join("demo/lock")).is_empty() {
        assert!(process_state(pid).is_some_and(|s| s != 'Z'), "the backup ended before it took the lock");
        assert!(start.elapsed() < Duration::from_secs(60), "the backup never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(800).saturating_sub(start.elapsed()));
    assert!(process_state(pid).is_some_and(|s| s != 'Z'), "the backup should still run when killed");
    run_ok(Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]), Duration::from_secs(10));
    let start = Instant::now();
    while process_state(pid) != Some('Z') {
        assert!(start.elapsed() < Duration::from_secs(30), "pid {pid} is not a zombie: state {:?}", process_state(pid));
        std::thread::sleep(Duration::from_millis(20));
    }

    let r = pk.run(&["backup", "--type", "full"]);
    let zombie = process_state(pid);
    drop(reaper);
    assert!(
        r.status.success(),
        "a backup after one killed and left a zombie (pid {pid}, state {zombie:?}) must run: {}",
        r.stderr.trim()
    );
    let out = pk.ok(&["verify"]);
    assert!(out.contains("1 backup") && out.contains("all good"), "{out}");
}

/// Issue 10, case 8: backups, archived WAL and restored data directories
/// must not be readable by every local user, whatever the umask of the
/// process writing them: repository files at most 0640, directories at
/// most 0750; a restored data directory 0700 with files at most 0600.
#[test]
fn repository_and_restored_files_are_private_under_umask_0022() {
    let dir = TestDir::new("holes-umask");
    // Not created here: pgkeep makes every directory of the repository.
    let repo = Repo::Local(dir.join("repo"));
    let pk = Pgkeep::new(&dir, "demo", "demo").with_umask("0022");
    // archive_command runs the same umask wrapper.
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    pk.write_config(&pg.addr, &repo);
    pk.ok(&["stanza-create"]);
    pg.pgbench_init(1);
    pk.ok(&["backup", "--type", "full"]);
    pg.pgbench(1, 1);
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg);

    let mut loose: Vec<String> = modes(repo.path())
        .into_iter()
        .filter(|(_, mode, _)| mode & 0o027 != 0)
        .map(|(p, mode, is_dir)| format!("repo/{} {:o}{}", p.display(), mode, if is_dir { " (dir)" } else { "" }))
        .collect();

    let target = restore_to(&dir, &pk, &incr, "restored");
    for (p, mode, is_dir) in modes(&target) {
        let bad = if p.as_os_str().is_empty() { mode != 0o700 } else { mode & 0o077 != 0 };
        if bad {
            loose.push(format!("restored/{} {:o}{}", p.display(), mode, if is_dir { " (dir)" } else { "" }));
        }
    }
    let n = loose.len();
    loose.truncate(12);
    assert!(n == 0, "{n} files or directories written under umask 0022 are readable by others, e.g.:\n{}", loose.join("\n"));
}
