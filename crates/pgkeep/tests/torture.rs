//! Randomized torture suite: one real PostgreSQL cluster (the source) goes
//! through a seeded random sequence of operations, with backups of random
//! type (`backup --type full|diff|incr`) between them; then every backup,
//! and a set of recorded time points, is restored into a new directory,
//! started (`Cluster::start_restored`: it never archives into the source's
//! repository) and checked against what the source held at that point:
//! - `pg_dump --create` of every database (template1 too) equal, without
//!   unlogged tables' data, and the same list of databases;
//! - `pg_amcheck --install-missing --all --heapallindexed` clean;
//! - `pg_check_visible` and `pg_check_frozen` (pg_visibility) empty for
//!   every table, TOAST table and materialized view of every database;
//! - `pg_checksums --check` clean once stopped cleanly.
//!
//! Each restored copy is removed right after its check.
//!
//! Operations (weights in [`OPS`]): pgbench; inserts, updates and deletes on
//! tables `t<N>` in several databases (with or without indexes, some with
//! `autovacuum_enabled = off`, some unlogged, some in a tablespace, some
//! with TOASTed values); VACUUM, VACUUM (FREEZE), VACUUM FULL, TRUNCATE,
//! CLUSTER; CREATE/DROP TABLE, CREATE/DROP INDEX (also CONCURRENTLY),
//! REINDEX; CREATE DATABASE with STRATEGY WAL_LOG or FILE_COPY, with or
//! without the OID of a dropped database (also dropped and made again at
//! once with its OID, mostly in the same tablespace, often left as its
//! template made it); DROP DATABASE; ALTER TABLE / ALTER DATABASE ... SET
//! TABLESPACE (two tablespaces, made at setup); CHECKPOINT; pg_switch_wal();
//! a crash (`pg_ctl stop -m immediate`, then start); an in-place restore of
//! an older backup (`restore --force --set LABEL --target-immediate` into
//! the source's own directory, then start it: it promotes to a new timeline
//! and archives on into the same stanza); a restore of the end of the
//! archive into a new directory (`--set` of the newest backup on the
//! source's history, or none) that is promoted and becomes the source (the
//! old one is stopped and removed); time marks; backups from a streaming
//! standby of the source (`--backup-standby y`, of random type: made with
//! `pg_basebackup -R` when there is none that streams, waited for until it
//! has replayed what the source wrote, dropped whenever the source is
//! restored in place or replaced).
//!
//! Expected states: before each backup the dump of every database is taken
//! with nothing written between it and the backup, so it is what `--set
//! LABEL --target-immediate` restores to. A time mark (after a quarter of
//! the backups, and as an operation of its own) is a write, 1.1 s, `now()`
//! from the server as the target time, the dumps, then a commit; it is
//! restored with `--target-time T`, with `--set` of the newest backup on
//! the source's history or without (pgkeep chooses), and with
//! `--target-timeline N` when its timeline is not the last one. The WAL of
//! a timeline is switched and archived before the source leaves it. Dumps
//! are kept gzipped under the test directory, one file per content.
//!
//! Failures are collected, and the test panics at the end with the seed,
//! the replay command, every problem in the order found (a one-line summary
//! of each, then in full), the backups with type, prior and timeline, and
//! the operation log (also printed as it goes). A restore of the source
//! that does not start is recorded, then done again in the way that works
//! (`--target-timeline current`, or `--set` of the newest backup on its
//! history) so that the run goes on; a restored source that differs from
//! what it should hold, or is unsound itself (pg_amcheck, pg_visibility), is
//! recorded too, then healed: the newest full backup taken from a sound
//! source is restored in place. Should the source stay unsound, later
//! findings say they may be inherited ("INHERITED?"; pg_visibility findings
//! the source itself had when a backup was taken are never counted against
//! that backup). Anything else that fails while the operations run stops
//! them (at that step); the backups taken so far are still all checked.
//!
//! Knobs:
//! - `TORTURE_SEED=N` replays a run (the seed is printed at the start and in
//!   the failure message); without it the seed comes from the clock;
//! - `TORTURE_STEPS=N` sets the number of random operations (default
//!   [`DEFAULT_STEPS`], a few minutes here); `TORTURE_STEPS=2000` is the
//!   long mode;
//! - `PGKEEP_TEST_KEEP=1` keeps the test directory.
//!
//! The same seed replays the same operations with the same parameters:
//! every choice is made by the PRNG from the seed and from the source's
//! catalog, which the earlier operations decided. (pgbench's own random
//! numbers, autovacuum's timing, the OIDs the server assigns and the
//! backup labels are not replayed: they change values, not the operations.)

mod support;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Operations in a default run (what CI runs each time): a few minutes here.
const DEFAULT_STEPS: usize = 80;
/// How long one SQL statement, dump or check may take.
const SQL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a server may take to start, recover and promote.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Most user databases alive at once (postgres included).
const MAX_DBS: usize = 5;
/// Most torture tables in one database.
const MAX_TABLES: usize = 8;
/// A table past this size gets no more inserts (keeps dumps small and every
/// table under the synchronized-scan threshold).
const MAX_TABLE_BYTES: u64 = 12 << 20;
/// Tablespaces created at setup (before the first backup, so every backup
/// has them all: a restore maps each by name, and no replay of a CREATE
/// TABLESPACE ever touches the source's own directories).
const TABLESPACES: [&str; 2] = ["ts1", "ts2"];

// ---------------------------------------------------------------- PRNG

/// splitmix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------- servers

/// How to reach a server, for psql, pg_dump and friends.
#[derive(Clone)]
struct Conn {
    socket: PathBuf,
    port: u16,
    cwd: PathBuf,
    log: PathBuf,
}

impl Conn {
    fn of_cluster(c: &Cluster, cwd: &Path) -> Conn {
        Conn { socket: c.addr.socket_dir.clone(), port: c.addr.port, cwd: cwd.to_owned(), log: c.log().to_owned() }
    }

    /// A PostgreSQL client program aimed at this server. Sequential scans
    /// start at the first page (no synchronized scans): a dump lists rows in
    /// their physical order, which a physical restore keeps.
    fn client(&self, program: &str) -> Command {
        let mut c = as_postgres(pg_tool(program), &self.cwd);
        c.arg("-h").arg(&self.socket).args(["-p", &self.port.to_string()]);
        c.env("PGOPTIONS", "-c synchronize_seqscans=off");
        c
    }

    fn try_sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let r = run(self.client("psql").args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql]), SQL_TIMEOUT);
        if r.status.success() {
            Ok(r.stdout.trim().to_owned())
        } else {
            Err(r.stderr.trim().to_owned())
        }
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        self.try_sql(db, sql).unwrap_or_else(|e| panic!("psql in {db}: {sql}\nfailed: {e}\n--- server log:\n{}", tail(&self.log, 30)))
    }

    /// Every database that takes connections (template1 too: a database
    /// is made from it), by name: what is dumped and checked.
    fn databases(&self) -> Vec<String> {
        let out = self.sql("postgres", "select datname from pg_database where datallowconn order by 1");
        out.lines().map(str::to_owned).collect()
    }

    /// The databases the operations work in (not the templates).
    fn user_databases(&self) -> Vec<String> {
        let out = self.sql("postgres", "select datname from pg_database where datallowconn and not datistemplate order by 1");
        out.lines().map(str::to_owned).collect()
    }

    /// `pg_dump --create` of `db` without unlogged tables' data (a restore
    /// or a crash empties them) and without pg_dump 15.14's random
    /// `\restrict` lines.
    fn dump(&self, db: &str) -> Result<String, String> {
        let r = run(self.client("pg_dump").args(["--create", "--no-unlogged-table-data", "-d", db]), SQL_TIMEOUT);
        if !r.status.success() {
            return Err(format!("pg_dump of {db} failed: {}", r.stderr.trim()));
        }
        Ok(r.stdout.lines().filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict ")).fold(
            String::with_capacity(r.stdout.len()),
            |mut s, l| {
                s.push_str(l);
                s.push('\n');
                s
            },
        ))
    }

    /// Tuples on all-visible pages that are not visible to all, and on
    /// all-frozen pages that are not frozen, in every table, TOAST table and
    /// materialized view of `db` (pg_visibility); at most `limit` lines.
    fn visibility(&self, db: &str, limit: usize) -> Result<Vec<String>, String> {
        let sql = "select rel || ' ' || tid || ' ' || what from ( \
            select c.oid::regclass::text as rel, v.t_ctid::text as tid, 'on an all-visible page, not visible to all' as what \
              from pg_class c cross join lateral pg_check_visible(c.oid) v \
             where c.relkind in ('r', 'm', 't') and c.relpersistence <> 't' \
            union all \
            select c.oid::regclass::text, f.t_ctid::text, 'on an all-frozen page, not frozen' \
              from pg_class c cross join lateral pg_check_frozen(c.oid) f \
             where c.relkind in ('r', 'm', 't') and c.relpersistence <> 't') x limit ";
        self.try_sql(db, &format!("{sql}{limit}")).map(|out| out.lines().map(str::to_owned).collect())
    }

    /// `pg_amcheck --heapallindexed` of every database: its findings, if any.
    fn amcheck(&self) -> Option<String> {
        let r = run(self.client("pg_amcheck").args(["--install-missing", "--all", "--heapallindexed"]), SQL_TIMEOUT);
        if r.status.success() && r.stdout.trim().is_empty() {
            return None;
        }
        let stderr: String = r.stderr.lines().filter(|l| !l.starts_with("NOTICE:")).map(|l| format!("{l}\n")).collect();
        Some(format!("pg_amcheck --heapallindexed ({}):\n{}\n{}", r.status, first_lines(&r.stdout, 30), first_lines(&stderr, 10)))
    }

    /// pg_visibility findings in every database, as `db: finding`.
    fn visibility_all(&self, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        for db in self.databases() {
            let _ = self.try_sql(&db, "create extension if not exists pg_visibility");
            match self.visibility(&db, limit) {
                Ok(v) => out.extend(v.into_iter().map(|l| format!("{db}: {l}"))),
                Err(e) => out.push(format!("{db}: pg_visibility failed: {e}")),
            }
        }
        out
    }

    /// The timeline being written.
    fn timeline(&self) -> u32 {
        let tl = self.sql("postgres", "select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)");
        u32::from_str_radix(&tl, 16).unwrap_or_else(|e| panic!("timeline {tl:?}: {e}"))
    }

    /// Waits until PostgreSQL reports `segment` (or a later one) archived.
    fn wait_archived(&self, segment: &str) {
        let start = Instant::now();
        loop {
            let row = self.sql("postgres", "select coalesce(last_archived_wal, ''), coalesce(last_failed_wal, '') from pg_stat_archiver");
            let (archived, failed) = row.split_once('|').unwrap();
            if archived.len() == 24 && archived >= segment {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{segment} not archived after 180 s (last archived {archived:?}, last failed {failed:?})\n--- server log:\n{}",
                tail(&self.log, 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The source: a data directory this suite starts, crashes, restores in
/// place and retires itself (the harness's `Cluster` has no crash-restart).
struct Server {
    data: PathBuf,
    conn: Conn,
}

impl Server {
    /// Starts it (archiving as its postgresql.conf says) and waits until it
    /// takes writes: after a restore, until it has promoted.
    fn start(&self) -> Result<(), String> {
        let c = &self.conn;
        let opts = format!("-c port={} -c unix_socket_directories={} -c listen_addresses=", c.port, c.socket.display());
        let t = START_TIMEOUT.as_secs().to_string();
        let r = run(
            as_postgres(pg_tool("pg_ctl"), &c.cwd)
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&c.log)
                .args(["-w", "-t", &t, "-o", &opts, "start"]),
            START_TIMEOUT + Duration::from_secs(30),
        );
        if !r.status.success() {
            return Err(format!("{} did not start: {}{}\n--- server log:\n{}", self.data.display(), r.stdout, r.stderr, tail(&c.log, 40)));
        }
        let start = Instant::now();
        loop {
            if c.try_sql("postgres", "select pg_is_in_recovery()").as_deref() == Ok("f") {
                return Ok(());
            }
            if !self.data.join("postmaster.pid").exists() {
                return Err(format!("{} stopped during recovery:\n--- server log:\n{}", self.data.display(), tail(&c.log, 40)));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "{} still in recovery after {START_TIMEOUT:?}:\n--- server log:\n{}",
                    self.data.display(),
                    tail(&c.log, 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&self, mode: &str) {
        let r = run(
            as_postgres(pg_tool("pg_ctl"), &self.conn.cwd).arg("-D").arg(&self.data).args(["-m", mode, "-w", "-t", "300", "stop"]),
            Duration::from_secs(330),
        );
        assert!(
            r.status.success(),
            "{} did not stop ({mode}): {}\n--- server log:\n{}",
            self.data.display(),
            r.stderr,
            tail(&self.conn.log, 30)
        );
    }

    fn addr(&self) -> PgAddr {
        PgAddr { data: self.data.clone(), socket_dir: self.conn.socket.clone(), port: self.conn.port }
    }
}

/// Stops whatever runs on `data` (immediate), if anything.
fn stop_if_running(data: &Path, cwd: &Path) {
    if data.join("postmaster.pid").exists() {
        let _ =
            run(as_postgres(pg_tool("pg_ctl"), cwd).arg("-D").arg(data).args(["-m", "immediate", "-w", "stop"]), Duration::from_secs(120));
    }
}

fn remove_path(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// The message of a caught panic.
fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "(panic without a message)".to_owned()
    }
}

/// The first difference between two dumps, with context; None when equal.
fn dump_diff(expected: &str, actual: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let i = e.iter().zip(&a).position(|(x, y)| x != y).unwrap_or(e.len().min(a.len()));
    let around = |v: &[&str]| {
        v[i.saturating_sub(4)..(i + 5).min(v.len())].iter().map(|l| format!("      {}", clip(l, 160))).collect::<Vec<_>>().join("\n")
    };
    Some(format!(
        "dumps differ ({} vs {} lines), first at line {}:\n    --- source:\n{}\n    --- restored:\n{}",
        e.len(),
        a.len(),
        i + 1,
        around(&e),
        around(&a)
    ))
}

/// One line saying what kind of failure a problem is.
fn summary(p: &str) -> String {
    let head = clip(p.lines().next().unwrap_or(""), 150);
    let mut kinds = Vec::new();
    for (needle, kind) in [
        ("did not start", "did not start"),
        ("stopped during recovery", "stopped during recovery"),
        ("is not a child of this server's history", "timeline not in its history"),
        ("is not in this server's history", "timeline not in its history"),
        ("could not locate required checkpoint record", "checkpoint record not found (wrong timeline's WAL)"),
        ("failed (exit status", "pgkeep restore failed"),
        ("dumps differ", "pg_dump differs"),
        ("pg_dump of", "pg_dump differs or fails"),
        ("databases:", "database list differs"),
        ("pg_amcheck", "pg_amcheck findings"),
        ("not visible to all", "pg_check_visible findings"),
        ("not frozen", "pg_check_frozen findings"),
        ("pg_checksums", "pg_checksums findings"),
        ("verify failed", "pgkeep verify failed"),
    ] {
        if p.contains(needle) && !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    if p.contains("INHERITED?") {
        kinds.push("maybe inherited from an unsound source");
    }
    if kinds.is_empty() {
        head
    } else {
        format!("{head}\n        => {}", kinds.join(", "))
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

fn first_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let mut out = lines.iter().take(n).map(|l| clip(l, 300)).collect::<Vec<_>>().join("\n");
    if lines.len() > n {
        let _ = write!(out, "\n... ({} more lines)", lines.len() - n);
    }
    out
}

// ---------------------------------------------------------------- the model

/// What the source held at a point: one stored dump per database.
#[derive(Clone)]
struct Expected {
    dumps: Vec<(String, PathBuf)>,
}

struct BackupRec {
    label: String,
    /// The `--type` asked for.
    asked: &'static str,
    /// From the manifest: the type stored, its prior and timeline.
    kind: String,
    prior: String,
    timeline: u64,
    step: usize,
    expected: Expected,
    /// What pg_visibility found on the source itself just before.
    source_visibility: Vec<String>,
    /// The step at which the source was found unsound, if it was before.
    tainted: Option<usize>,
}

struct TimeMark {
    step: usize,
    /// RFC 3339, microseconds, UTC.
    time: String,
    timeline: u32,
    /// Restore with `--set` this backup (the newest on the source's history
    /// then), or let pgkeep choose.
    set: Option<usize>,
    expected: Expected,
    source_visibility: Vec<String>,
    tainted: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Pgbench,
    Insert,
    Update,
    Delete,
    Vacuum,
    VacuumFreeze,
    VacuumFull,
    Truncate,
    Cluster,
    CreateTable,
    DropTable,
    CreateIndex,
    DropIndex,
    Reindex,
    CreateDb,
    DropDb,
    RecreateDb,
    SetTablespace,
    DbSetTablespace,
    Checkpoint,
    SwitchWal,
    Crash,
    RestoreInPlace,
    PromoteNewDir,
    TimeMark,
    Backup,
    StandbyBackup,
}

/// Relative weights of the operations.
const OPS: &[(Op, u32)] = &[
    (Op::Pgbench, 90),
    (Op::Insert, 110),
    (Op::Update, 80),
    (Op::Delete, 80),
    (Op::Vacuum, 60),
    (Op::VacuumFreeze, 30),
    (Op::VacuumFull, 15),
    (Op::Truncate, 12),
    (Op::Cluster, 15),
    (Op::CreateTable, 40),
    (Op::DropTable, 15),
    (Op::CreateIndex, 30),
    (Op::DropIndex, 15),
    (Op::Reindex, 15),
    (Op::CreateDb, 40),
    (Op::DropDb, 25),
    (Op::RecreateDb, 30),
    (Op::SetTablespace, 20),
    (Op::DbSetTablespace, 10),
    (Op::Checkpoint, 30),
    (Op::SwitchWal, 20),
    (Op::Crash, 20),
    (Op::RestoreInPlace, 25),
    (Op::PromoteNewDir, 15),
    (Op::TimeMark, 15),
    (Op::Backup, 160),
    (Op::StandbyBackup, 40),
];

struct Table {
    name: String,
    indexes: Vec<String>,
    size: u64,
}

impl Table {
    /// Made by this suite (t<N>): free for DML, TRUNCATE and DROP.
    fn ours(&self) -> bool {
        self.name.len() > 1 && self.name.starts_with('t') && self.name[1..].bytes().all(|b| b.is_ascii_digit())
    }
}

struct Torture {
    seed: u64,
    steps: usize,
    rng: Rng,
    step: usize,
    log: Vec<String>,
    /// Counter for new names (tables, indexes, databases).
    names: u32,
    /// Source generation (a new data directory after each promotion of a
    /// restored copy).
    generation: u32,
    checks: u32,
    repo: Repo,
    pk: Pgkeep,
    src: Server,
    /// The source's tablespaces: name, current location.
    tablespaces: Vec<(String, PathBuf)>,
    timeline: u32,
    backups: Vec<BackupRec>,
    marks: Vec<TimeMark>,
    /// The newest backup on the source's current history.
    base: Option<usize>,
    /// OIDs of dropped databases, for `create database ... oid N`.
    dropped_oids: Vec<u32>,
    /// The first step at which the restored source itself was found unsound
    /// (pg_amcheck or pg_visibility): later backups copy what it holds.
    tainted: Option<usize>,
    failures: Vec<String>,
    started: Instant,
    /// A streaming standby of the source, for backups from a standby.
    standby: Option<Server>,
    /// How many standbys were made (their directories are `stby<N>`).
    standbys: u32,
    /// Last: dropped after everything, stopping any server still running.
    dir: TestDir,
}

impl Torture {
    // ------------------------------------------------------------ logging

    fn note(&mut self, what: impl Into<String>) {
        let line = format!("#{:<4} tl{} {}", self.step, self.timeline, what.into());
        eprintln!("torture: {line}");
        self.log.push(line);
    }

    /// Appends the outcome to the last line of the log.
    fn outcome(&mut self, what: impl AsRef<str>) {
        let what = what.as_ref();
        eprintln!("torture:       -> {what}");
        if let Some(l) = self.log.last_mut() {
            let _ = write!(l, "  -> {}", clip(what, 400));
        }
    }

    fn replay_hint(&self) -> String {
        format!(
            "TORTURE_SEED={} TORTURE_STEPS={} cargo test -p pgkeep --test torture -- --nocapture --test-threads=1",
            self.seed, self.steps
        )
    }

    fn report(&self, problems: &[String]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n=== TORTURE FAILED: seed {} ({} steps, {} done) ===", self.seed, self.steps, self.step);
        let _ = writeln!(s, "replay: {}", self.replay_hint());
        let _ = writeln!(s, "{} problem(s), in short:", problems.len());
        for (i, p) in problems.iter().enumerate() {
            let _ = writeln!(s, "  [{}] {}", i + 1, summary(p));
        }
        let _ = writeln!(s, "in full:");
        for (i, p) in problems.iter().enumerate() {
            let _ = writeln!(s, "[{}] {}\n", i + 1, p);
        }
        let _ = writeln!(s, "backups (label, --type asked, stored type, prior, timeline, step):");
        for b in &self.backups {
            let _ = writeln!(s, "  {} {} {} prior={} tl{} #{}", b.label, b.asked, b.kind, b.prior, b.timeline, b.step);
        }
        let _ = writeln!(s, "operation log:");
        for l in &self.log {
            let _ = writeln!(s, "  {l}");
        }
        let _ = writeln!(s, "=== end of report, seed {} ===", self.seed);
        s
    }

    // ------------------------------------------------------------ setup

    fn setup(seed: u64, steps: usize) -> Torture {
        let dir = TestDir::new("torture");
        let repo = Repo::local(&dir, "repo");
        let pk = Pgkeep::new(&dir, "demo", "demo");
        let data = dir.join("src0");
        run_ok(
            as_postgres(pg_tool("initdb"), dir.path())
                .args(["-k", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-D"])
                .arg(&data),
            SQL_TIMEOUT,
        );
        let conf = format!(
            "\n# pgkeep torture\nlisten_addresses = ''\nwal_level = replica\narchive_mode = on\narchive_command = '{}'\n\
             max_wal_size = 128MB\nautovacuum_naptime = 2s\nlog_checkpoints = on\n",
            pk.archive_command()
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        f.write_all(conf.as_bytes()).unwrap();
        let src = Server {
            data,
            conn: Conn { socket: dir.path().to_owned(), port: free_port(), cwd: dir.path().to_owned(), log: dir.join("src0.log") },
        };
        std::fs::create_dir_all(dir.join("expected")).unwrap();
        let mut t = Torture {
            seed,
            steps,
            rng: Rng(seed),
            step: 0,
            log: Vec::new(),
            names: 0,
            generation: 0,
            checks: 0,
            repo,
            pk,
            src,
            tablespaces: Vec::new(),
            timeline: 1,
            backups: Vec::new(),
            marks: Vec::new(),
            base: None,
            dropped_oids: Vec::new(),
            tainted: None,
            failures: Vec::new(),
            started: Instant::now(),
            standby: None,
            standbys: 0,
            dir,
        };
        t.src.start().unwrap_or_else(|e| panic!("{e}"));
        t.pk.write_config(&t.src.addr(), &t.repo);
        t.pk.ok(&["stanza-create"]);
        t.note("setup: initdb -k, stanza-create, pgbench -i -s 1, pg_visibility and amcheck in template1 and postgres");
        run_ok(t.src.conn.client("pgbench").args(["-i", "-q", "-s", "1", "postgres"]), SQL_TIMEOUT);
        for db in ["template1", "postgres"] {
            t.src.conn.sql(db, "create extension pg_visibility");
            t.src.conn.sql(db, "create extension amcheck");
        }
        t.exec("postgres", "create table torture_marks (step int, at timestamptz, what text)");
        for name in TABLESPACES {
            let loc = t.dir.mkdir(&format!("{name}-g0"));
            t.exec("postgres", &format!("create tablespace {name} location '{}'", loc.display()));
            t.tablespaces.push((name.to_owned(), loc));
        }
        t.exec("postgres", "create database d0 strategy wal_log");
        t.names = 1;
        for db in ["postgres", "d0"] {
            t.create_table(db);
        }
        t.backup("full");
        t
    }

    fn next_name(&mut self) -> u32 {
        self.names += 1;
        self.names
    }

    // ------------------------------------------------------------ SQL

    fn exec(&mut self, db: &str, sql: &str) -> String {
        self.note(format!("[{db}] {sql}"));
        self.src.conn.sql(db, sql)
    }

    /// A statement PostgreSQL may legitimately refuse (logged as such).
    fn exec_may_fail(&mut self, db: &str, sql: &str) -> bool {
        self.note(format!("[{db}] {sql}"));
        match self.src.conn.try_sql(db, sql) {
            Ok(_) => true,
            Err(e) => {
                self.outcome(format!("refused: {}", e.replace('\n', " ")));
                false
            }
        }
    }

    fn tables(&self, db: &str) -> Vec<Table> {
        let out = self.src.conn.sql(
            db,
            "select c.relname, coalesce((select string_agg(i.relname, ' ' order by i.relname) from pg_index x \
             join pg_class i on i.oid = x.indexrelid where x.indrelid = c.oid), ''), pg_total_relation_size(c.oid) \
             from pg_class c where c.relnamespace = 'public'::regnamespace and c.relkind = 'r' order by c.relname",
        );
        out.lines()
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                Table {
                    name: f[0].to_owned(),
                    indexes: f[1].split_whitespace().map(str::to_owned).collect(),
                    size: f[2].parse().unwrap_or(0),
                }
            })
            .collect()
    }

    fn pick_db(&mut self) -> String {
        let dbs = self.src.conn.user_databases();
        self.rng.pick(&dbs).clone()
    }

    /// A database and one of its tables satisfying `ok`, if any.
    fn pick_table(&mut self, ok: impl Fn(&Table) -> bool) -> Option<(String, Table)> {
        let db = self.pick_db();
        let mut tables: Vec<Table> = self.tables(&db).into_iter().filter(|t| ok(t)).collect();
        if tables.is_empty() {
            return None;
        }
        let i = self.rng.below(tables.len() as u64) as usize;
        Some((db, tables.swap_remove(i)))
    }

    fn pick_tablespace(&mut self, with_default: bool) -> String {
        let mut names: Vec<String> = self.tablespaces.iter().map(|(n, _)| n.clone()).collect();
        if with_default {
            names.push("pg_default".into());
        }
        self.rng.pick(&names).clone()
    }

    fn create_table(&mut self, db: &str) {
        let name = format!("t{}", self.next_name());
        let pkey = self.rng.chance(0.6);
        let unlogged = self.rng.chance(0.15);
        let av_off = self.rng.chance(0.5);
        let ts = if self.rng.chance(0.2) { Some(self.pick_tablespace(false)) } else { None };
        let sql = format!(
            "create {}table {name} (id bigint{}, k int not null, v text, big text){}{}",
            if unlogged { "unlogged " } else { "" },
            if pkey { " primary key" } else { "" },
            if av_off { " with (autovacuum_enabled = off)" } else { "" },
            ts.map(|t| format!(" tablespace {t}")).unwrap_or_default()
        );
        self.exec(db, &sql);
        if self.rng.chance(0.5) {
            self.exec(db, &format!("create index {name}_k on {name} (k)"));
        }
        let n = *self.rng.pick(&[0, 10, 200, 1000, 3000]);
        if n > 0 {
            self.insert(db, &name, n);
        }
    }

    fn insert(&mut self, db: &str, table: &str, n: u64) {
        let (s, w) = (self.rng.below(1_000_000), *self.rng.pick(&[0, 0, 20, 100, 400]));
        let toast = *self.rng.pick(&[0, 0, 0, 60, 250]);
        let big = if toast == 0 {
            "null".to_owned()
        } else {
            format!("case when g % 37 = 0 then (select string_agg(md5((g + i)::text), '') from generate_series(1, {toast}) i) end")
        };
        self.exec(
            db,
            &format!(
                "insert into {table} (id, k, v, big) select m + g, (g::bigint * {s}) % 1000, md5((m + g + {s})::text) || repeat('x', {w}), {big} \
                 from (select coalesce(max(id), 0) as m from {table}) s, generate_series(1, {n}) g"
            ),
        );
    }

    // ------------------------------------------------------------ state

    /// A dump of every database of the source.
    fn dumps_now(&self) -> Result<BTreeMap<String, String>, String> {
        self.src.conn.databases().into_iter().map(|db| self.src.conn.dump(&db).map(|d| (db, d))).collect()
    }

    /// Stores one dump (gzip, one file per distinct content).
    fn store(&self, text: &str) -> PathBuf {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let path = self.dir.join("expected").join(format!("{:016x}-{}.sql.gz", h.finish(), text.len()));
        if !path.exists() {
            let tmp = path.with_extension("tmp");
            let mut child = Command::new("gzip")
                .args(["-1", "-c"])
                .stdin(Stdio::piped())
                .stdout(std::fs::File::create(&tmp).unwrap())
                .spawn()
                .expect("start gzip");
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            assert!(child.wait().unwrap().success(), "gzip failed");
            std::fs::rename(&tmp, &path).unwrap();
        }
        path
    }

    fn expected_now(&self) -> Expected {
        let dumps = self.dumps_now().unwrap_or_else(|e| panic!("the source cannot be dumped: {e}"));
        Expected { dumps: dumps.into_iter().map(|(db, d)| (db, self.store(&d))).collect() }
    }

    fn load(path: &Path) -> String {
        run_ok(Command::new("gzip").arg("-dc").arg(path), SQL_TIMEOUT)
    }

    /// pg_visibility findings on the source, every database (the
    /// extension is in template1, so in every database already: nothing is
    /// written).
    fn source_visibility(&self) -> Vec<String> {
        self.src.conn.visibility_all(1000)
    }

    /// After the source was restored: it must be sound itself (pg_amcheck,
    /// pg_visibility). Findings are failures of that restore; true when
    /// there are none.
    fn check_source(&mut self, what: &str) -> bool {
        let mut problems = Vec::new();
        problems.extend(self.src.conn.amcheck());
        let vis = self.source_visibility();
        if !vis.is_empty() {
            problems.push(format!("pg_visibility:\n    {}", vis.iter().take(20).cloned().collect::<Vec<_>>().join("\n    ")));
        }
        if problems.is_empty() {
            return true;
        }
        self.record(format!("step {}: {what}: the restored source itself:\n  {}", self.step, problems.join("\n  ")));
        self.tainted.get_or_insert(self.step);
        false
    }

    /// After a restore of the source that went wrong (recorded already):
    /// restores in place the newest full backup taken from a sound source,
    /// so that the rest of the run starts from a sound state again. Only
    /// when that does not work either does the source stay unsound (later
    /// findings then say they may be inherited).
    fn heal(&mut self) {
        let Some(i) = self.backups.iter().rposition(|b| b.kind == "full" && b.tainted.is_none()) else { return };
        self.drop_standby();
        let label = self.backups[i].label.clone();
        self.note(format!("heal the source: in-place restore of {label}, the newest full backup of a sound source"));
        // Archive what this timeline wrote (time marks need the commit
        // after them), if the source still answers.
        if let Ok(seg) = self.src.conn.try_sql("postgres", "select pg_walfile_name(pg_switch_wal())") {
            self.src.conn.wait_archived(&seg);
        }
        if self.src.data.join("postmaster.pid").exists() {
            self.src.stop("fast");
        }
        let data = self.src.data.to_str().unwrap().to_owned();
        let mut args: Vec<String> =
            ["restore", "--pg-data", &data, "--force", "--set", &label, "--target-immediate", "--target-timeline", "current"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(Self::ts_map_args(&self.tablespaces));
        self.run_restore(&args);
        if let Err(e) = self.src.start() {
            panic!("healing the source: it did not start after the restore of the full backup {label}: {e}");
        }
        self.timeline = self.src.conn.timeline();
        self.outcome(format!("promoted on timeline {}", self.timeline));
        let expected: BTreeMap<String, String> = self.backups[i].expected.dumps.iter().map(|(db, p)| (db.clone(), Self::load(p))).collect();
        let what = format!("healing: in-place restore of the full backup {label}");
        if self.compare_source(&what, &expected) & self.check_source(&what) {
            self.tainted = None;
        }
        self.base = Some(i);
    }

    /// Waits until the source takes writes again after PostgreSQL restarted
    /// it by itself (a PANIC).
    fn wait_source_back(&self) {
        let start = Instant::now();
        while self.src.conn.try_sql("postgres", "select pg_is_in_recovery()").as_deref() != Ok("f") {
            assert!(start.elapsed() < START_TIMEOUT, "the source did not come back:\n--- server log:\n{}", tail(&self.src.conn.log, 40));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A write, a WAL switch, and the wait until it is archived: the old
    /// timeline's WAL is whole in the repository (a commit after every time
    /// mark included) before the source stops for good or goes back.
    fn close_wal(&mut self, why: &str) {
        let step = self.step;
        self.exec("postgres", &format!("insert into torture_marks values ({step}, now(), '{why}')"));
        let seg = self.src.conn.sql("postgres", "select pg_walfile_name(pg_switch_wal())");
        self.src.conn.wait_archived(&seg);
        self.outcome(format!("switched and archived {seg}"));
    }

    // ------------------------------------------------------------ operations

    fn choose_op(&mut self) -> Op {
        let total: u32 = OPS.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(u64::from(total)) as u32;
        for (op, w) in OPS {
            if x < *w {
                return *op;
            }
            x -= w;
        }
        unreachable!()
    }

    fn run_ops(&mut self) {
        for step in 1..=self.steps {
            self.step = step;
            let op = self.choose_op();
            self.apply(op);
        }
        self.step = self.steps + 1;
        self.close_wal("end of the run");
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Pgbench => {
                let n = self.rng.range(20, 150).to_string();
                self.note(format!("pgbench -n -t {n} -c 2 -j 2 postgres"));
                run_ok(self.src.conn.client("pgbench").args(["-n", "-t", &n, "-c", "2", "-j", "2", "postgres"]), SQL_TIMEOUT);
            }
            Op::Insert => {
                let Some((db, t)) = self.pick_table(Table::ours) else { return self.apply(Op::CreateTable) };
                if t.size > MAX_TABLE_BYTES {
                    return self.delete(&db, &t);
                }
                let n = *self.rng.pick(&[1, 10, 100, 500, 2000, 5000]);
                self.insert(&db, &t.name, n);
            }
            Op::Update => {
                let Some((db, t)) = self.pick_table(Table::ours) else { return self.apply(Op::CreateTable) };
                let m = if t.size > MAX_TABLE_BYTES { 50 } else { *self.rng.pick(&[1, 2, 3, 7, 20, 100, 1000]) };
                let r = self.rng.below(m);
                let set = *self.rng.pick(&["k = k + 1", "v = md5(v)", "k = k + 1, v = md5(v) || 'u'", "big = null"]);
                self.exec(&db, &format!("update {} set {set} where id % {m} = {r}", t.name));
            }
            Op::Delete => {
                let Some((db, t)) = self.pick_table(Table::ours) else { return self.apply(Op::CreateTable) };
                self.delete(&db, &t);
            }
            Op::Vacuum => {
                let Some((db, t)) = self.pick_table(|_| true) else { return };
                let sql = match self.rng.below(5) {
                    0 => "vacuum".to_owned(),
                    1 => format!("vacuum (analyze) {}", t.name),
                    2 => format!("vacuum (disable_page_skipping) {}", t.name),
                    _ => format!("vacuum {}", t.name),
                };
                self.exec(&db, &sql);
            }
            Op::VacuumFreeze => {
                let Some((db, t)) = self.pick_table(|_| true) else { return };
                let sql = if self.rng.chance(0.2) { "vacuum (freeze)".to_owned() } else { format!("vacuum (freeze) {}", t.name) };
                self.exec(&db, &sql);
            }
            Op::VacuumFull => {
                let Some((db, t)) = self.pick_table(|_| true) else { return };
                self.exec(&db, &format!("vacuum full {}", t.name));
            }
            Op::Truncate => {
                let Some((db, t)) = self.pick_table(Table::ours) else { return };
                self.exec(&db, &format!("truncate {}", t.name));
            }
            Op::Cluster => {
                let Some((db, t)) = self.pick_table(|t| !t.indexes.is_empty()) else { return };
                let idx = self.rng.pick(&t.indexes).clone();
                self.exec(&db, &format!("cluster {} using {idx}", t.name));
            }
            Op::CreateTable => {
                let db = self.pick_db();
                if self.tables(&db).iter().filter(|t| t.ours()).count() >= MAX_TABLES {
                    return self.apply(Op::DropTable);
                }
                self.create_table(&db);
            }
            Op::DropTable => {
                let Some((db, t)) = self.pick_table(Table::ours) else { return };
                self.exec(&db, &format!("drop table {}", t.name));
            }
            Op::CreateIndex => {
                let Some((db, t)) = self.pick_table(Table::ours) else { return };
                let name = format!("{}_i{}", t.name, self.next_name());
                let col = *self.rng.pick(&["k", "v", "k, id", "(md5(v))"]);
                let conc = if self.rng.chance(0.3) { "concurrently " } else { "" };
                let ts = if self.rng.chance(0.25) { format!(" tablespace {}", self.pick_tablespace(true)) } else { String::new() };
                self.exec(&db, &format!("create index {conc}{name} on {} ({col}){ts}", t.name));
            }
            Op::DropIndex => {
                let Some((db, t)) = self.pick_table(|t| t.ours() && t.indexes.iter().any(|i| !i.ends_with("_pkey"))) else { return };
                let idx: Vec<String> = t.indexes.iter().filter(|i| !i.ends_with("_pkey")).cloned().collect();
                let idx = self.rng.pick(&idx).clone();
                self.exec(&db, &format!("drop index {idx}"));
            }
            Op::Reindex => {
                let Some((db, t)) = self.pick_table(|t| !t.indexes.is_empty()) else { return };
                let sql = match self.rng.below(3) {
                    0 => format!("reindex table concurrently {}", t.name),
                    1 => format!("reindex index {}", self.rng.pick(&t.indexes).clone()),
                    _ => format!("reindex table {}", t.name),
                };
                self.exec(&db, &sql);
            }
            Op::CreateDb => {
                if self.src.conn.user_databases().len() >= MAX_DBS {
                    return self.apply(Op::DropDb);
                }
                let used: BTreeSet<u32> =
                    self.src.conn.sql("postgres", "select oid from pg_database").lines().filter_map(|l| l.parse().ok()).collect();
                let free: Vec<u32> = self.dropped_oids.iter().copied().filter(|o| !used.contains(o)).collect();
                let oid = if !free.is_empty() && self.rng.chance(0.7) { Some(*self.rng.pick(&free)) } else { None };
                self.create_db(oid, None);
            }
            Op::DropDb => {
                if self.drop_db().is_none() {
                    self.apply(Op::CreateDb);
                }
            }
            Op::RecreateDb => {
                // Drop a database and create another at once with its OID.
                // Drop a database and create another at once with its OID,
                // mostly in the same tablespace (the same paths).
                if let Some((oid, ts)) = self.drop_db() {
                    let ts = if self.rng.chance(0.75) { Some(ts) } else { None };
                    self.create_db(Some(oid), ts);
                }
            }
            Op::SetTablespace => {
                let Some((db, t)) = self.pick_table(|_| true) else { return };
                let ts = self.pick_tablespace(true);
                self.exec(&db, &format!("alter table {} set tablespace {ts}", t.name));
            }
            Op::DbSetTablespace => {
                let dbs: Vec<String> = self.src.conn.user_databases().into_iter().filter(|d| d != "postgres").collect();
                if dbs.is_empty() {
                    return;
                }
                let db = self.rng.pick(&dbs).clone();
                let ts = self.pick_tablespace(true);
                self.exec_may_fail("postgres", &format!("alter database {db} set tablespace {ts}"));
            }
            Op::Checkpoint => {
                self.exec("postgres", "checkpoint");
            }
            Op::SwitchWal => {
                let step = self.step;
                self.exec("postgres", &format!("insert into torture_marks values ({step}, now(), 'switch')"));
                self.exec("postgres", "select pg_switch_wal()");
            }
            Op::Crash => {
                self.note("crash: pg_ctl stop -m immediate, then start (crash recovery)");
                self.src.stop("immediate");
                if let Err(e) = self.src.start() {
                    panic!("the source did not come back after a crash: {e}");
                }
            }
            Op::RestoreInPlace => self.restore_in_place(),
            Op::PromoteNewDir => self.promote_new_dir(),
            Op::TimeMark => self.time_mark(),
            Op::Backup => {
                let kind = *self.rng.pick(&["full", "diff", "diff", "incr", "incr", "incr", "incr"]);
                self.backup(kind);
                if self.rng.chance(0.25) {
                    self.time_mark();
                }
            }
            Op::StandbyBackup => {
                let kind = *self.rng.pick(&["full", "diff", "incr", "incr", "incr"]);
                self.standby_backup(kind);
            }
        }
    }

    /// `create database` (a random strategy, `oid` when given, in `ts` when
    /// given, else maybe in a random tablespace), maybe with a table or two.
    fn create_db(&mut self, oid: Option<u32>, ts: Option<String>) {
        let name = format!("d{}", self.next_name());
        let strategy = *self.rng.pick(&["wal_log", "file_copy"]);
        let oid = oid.map(|o| format!(" oid {o}")).unwrap_or_default();
        let ts = match ts {
            Some(ts) => format!(" tablespace {ts}"),
            None if self.rng.chance(0.15) => format!(" tablespace {}", self.pick_tablespace(false)),
            None => String::new(),
        };
        // Often left as its template made it: a database that has changed
        // less than the one that had its OID shows what a restore kept.
        if self.exec_may_fail("postgres", &format!("create database {name} with{oid} strategy {strategy}{ts}")) && self.rng.chance(0.6) {
            self.create_table(&name);
            if self.rng.chance(0.5) {
                self.create_table(&name);
            }
        }
    }

    /// Drops a database other than postgres; returns its OID and tablespace
    /// (None when there is none to drop).
    fn drop_db(&mut self) -> Option<(u32, String)> {
        let dbs: Vec<String> = self.src.conn.user_databases().into_iter().filter(|d| d != "postgres").collect();
        if dbs.is_empty() {
            return None;
        }
        let db = self.rng.pick(&dbs).clone();
        let row = self.src.conn.sql(
            "postgres",
            &format!("select d.oid, t.spcname from pg_database d join pg_tablespace t on t.oid = d.dattablespace where datname = '{db}'"),
        );
        let (oid, ts) = row.split_once('|').unwrap();
        let (oid, ts): (u32, String) = (oid.parse().unwrap(), ts.to_owned());
        let sql = format!("drop database {db} with (force)");
        self.note(format!("[postgres] {sql}"));
        if let Err(e) = self.src.conn.try_sql("postgres", &sql) {
            // PostgreSQL 15 itself (no pgkeep in it): dropping a database
            // made with the OID of one dropped just before can PANIC at
            // commit ("trying to drop stats entry already dropped"); the
            // drop is committed and the server restarts.
            if !e.contains("trying to drop stats entry already dropped") {
                panic!("psql in postgres: {sql}\nfailed: {e}\n--- server log:\n{}", tail(&self.src.conn.log, 30));
            }
            self.outcome(format!(
                "PostgreSQL PANIC (its own stats bug with a reused database OID, not pgkeep's): {}",
                e.replace('\n', " ")
            ));
            self.wait_source_back();
            assert!(!self.src.conn.user_databases().contains(&db), "{db} is still there after the PANIC of its drop");
        }
        self.outcome(format!("oid {oid} free"));
        if !self.dropped_oids.contains(&oid) {
            self.dropped_oids.push(oid);
        }
        Some((oid, ts))
    }

    fn delete(&mut self, db: &str, t: &Table) {
        let sql = match self.rng.below(3) {
            0 => format!("delete from {} where id > (select max(id) - {} from {})", t.name, self.rng.pick(&[10, 300, 3000]), t.name),
            _ => {
                let m = *self.rng.pick(&[1, 2, 3, 10, 100]);
                format!("delete from {} where id % {m} = {}", t.name, self.rng.below(m))
            }
        };
        self.exec(db, &sql);
    }

    fn backup(&mut self, asked: &'static str) {
        self.backup_with(asked, &[]);
    }

    /// A backup read from a streaming standby of the source, once it has
    /// replayed everything the source wrote (so that, as for a backup of
    /// the source, nothing is written between the expected dumps and the
    /// backup's end).
    fn standby_backup(&mut self, asked: &'static str) {
        let standby = self.ensure_standby();
        let lsn = self.src.conn.sql("postgres", "select pg_current_wal_lsn()");
        let sql = format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        let start = Instant::now();
        while standby.conn.try_sql("postgres", &sql).as_deref() != Ok("t") {
            assert!(start.elapsed() < START_TIMEOUT, "the standby did not replay to {lsn}:\n{}", tail(&standby.conn.log, 30));
            std::thread::sleep(Duration::from_millis(100));
        }
        let (data, port) = (standby.data.to_str().unwrap().to_owned(), standby.conn.port.to_string());
        self.backup_with(asked, &["--backup-standby", "y", "--standby-data", &data, "--standby-port", &port]);
    }

    /// The standby, made now when there is none that streams from the
    /// source: `pg_basebackup -R` (each tablespace mapped to a directory of
    /// its own), started, streaming.
    fn ensure_standby(&mut self) -> Server {
        if let Some(s) = &self.standby {
            let streaming = s.conn.try_sql("postgres", "select coalesce((select status from pg_stat_wal_receiver), 'none')");
            if streaming.as_deref() == Ok("streaming") {
                return Server { data: s.data.clone(), conn: s.conn.clone() };
            }
            self.note("the standby does not stream from the source: made again");
            self.drop_standby();
        }
        self.standbys += 1;
        let k = self.standbys;
        let data = self.dir.join(&format!("stby{k}"));
        let mut cmd = self.src.conn.client("pg_basebackup");
        cmd.arg("-D").arg(&data).args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast"]);
        for (name, loc) in &self.tablespaces {
            cmd.arg("-T").arg(format!("{}={}", loc.display(), self.dir.join(&format!("{name}-stby{k}")).display()));
        }
        run_ok(&mut cmd, SQL_TIMEOUT);
        // A source restored in place keeps the recovery target pgkeep
        // wrote in its postgresql.auto.conf (ignored once promoted); a
        // copy would stop at it and promote, as the README says: a DBA
        // removes it, and so does this.
        let auto = data.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&auto).unwrap_or_default();
        let kept: String = text.lines().filter(|l| !l.trim_start().starts_with("recovery_target")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&auto, kept).unwrap();
        let conn = Conn {
            socket: self.dir.path().to_owned(),
            port: free_port(),
            cwd: self.dir.path().to_owned(),
            log: self.dir.join(&format!("stby{k}.log")),
        };
        let opts = format!("-c port={} -c unix_socket_directories={} -c listen_addresses=", conn.port, conn.socket.display());
        run_ok(
            as_postgres(pg_tool("pg_ctl"), &conn.cwd).arg("-D").arg(&data).arg("-l").arg(&conn.log).args(["-w", "-o", &opts, "start"]),
            START_TIMEOUT,
        );
        let start = Instant::now();
        while conn.try_sql("postgres", "select coalesce((select status from pg_stat_wal_receiver), 'none')").as_deref() != Ok("streaming") {
            assert!(start.elapsed() < START_TIMEOUT, "standby stby{k} does not stream:\n{}", tail(&conn.log, 30));
            std::thread::sleep(Duration::from_millis(200));
        }
        self.outcome(format!("standby stby{k} made (pg_basebackup -R), streaming"));
        self.standby = Some(Server { data: data.clone(), conn: conn.clone() });
        Server { data, conn }
    }

    /// Stops and removes the standby, when there is one: the source is
    /// about to be restored in place or replaced, which it cannot follow.
    fn drop_standby(&mut self) {
        if let Some(s) = self.standby.take() {
            stop_if_running(&s.data, &s.conn.cwd);
            remove_path(&s.data);
            let k = s.data.file_name().unwrap().to_string_lossy().trim_start_matches("stby").to_owned();
            for (name, _) in &self.tablespaces {
                remove_path(&self.dir.join(&format!("{name}-stby{k}")));
            }
        }
    }

    fn backup_with(&mut self, asked: &'static str, extra: &[&str]) {
        let source_visibility = self.source_visibility();
        let expected = self.expected_now();
        let from = if extra.is_empty() { "" } else { " from the standby" };
        self.note(format!("backup --type {asked}{from}"));
        let mut args = vec!["backup", "--type", asked];
        args.extend_from_slice(extra);
        let r = self.pk.run(&args);
        assert!(
            r.status.success(),
            "pgkeep backup --type {asked}{from} failed ({}):\nstdout: {}\nstderr: {}",
            r.status,
            r.stdout,
            r.stderr
        );
        let label = r.stdout.trim().to_owned();
        let m = read_manifest(&self.repo, &label);
        let (kind, prior, timeline) = (
            m["type"].as_str().unwrap_or("?").to_owned(),
            m["prior"].as_str().unwrap_or("-").to_owned(),
            m["timeline"].as_u64().unwrap_or(0),
        );
        let vis = if source_visibility.is_empty() {
            String::new()
        } else {
            format!("; pg_visibility on the source before it: {}", source_visibility.join("; "))
        };
        self.outcome(format!("{label} ({kind}, prior {prior}, timeline {timeline}){vis}"));
        let tainted = self.tainted;
        self.backups.push(BackupRec { label, asked, kind, prior, timeline, step: self.step, expected, source_visibility, tainted });
        self.base = Some(self.backups.len() - 1);
    }

    fn time_mark(&mut self) {
        let step = self.step;
        self.exec("postgres", &format!("insert into torture_marks values ({step}, now(), 'time mark')"));
        std::thread::sleep(Duration::from_millis(1100));
        let time = self.src.conn.sql("postgres", "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
        let source_visibility = self.source_visibility();
        let expected = self.expected_now();
        // A commit right away: recovery to the time stops at the first
        // commit after it, and replays everything before that commit, also
        // what is not transactional (DROP DATABASE marks the database
        // invalid in place before its commit).
        self.src.conn.sql("postgres", &format!("insert into torture_marks values ({step}, now(), 'after time mark')"));
        let set = if self.rng.chance(0.5) { self.base } else { None };
        let with = set.map(|i| format!(", to restore with --set {}", self.backups[i].label)).unwrap_or_default();
        self.outcome(format!("time mark {time}{with}"));
        let tainted = self.tainted;
        self.marks.push(TimeMark { step, time, timeline: self.timeline, set, expected, source_visibility, tainted });
    }

    fn ts_map_args(map: &[(String, PathBuf)]) -> Vec<String> {
        map.iter().flat_map(|(n, d)| ["--tablespace-map".to_owned(), format!("{n}={}", d.display())]).collect()
    }

    /// A failure found while the operations run that does not stop them.
    fn record(&mut self, msg: String) {
        eprintln!("torture: FAILED {msg}");
        self.outcome(format!("FAILED: {} (see the report)", clip(msg.lines().next().unwrap_or(""), 200)));
        self.failures.push(msg);
    }

    /// Compares the source with what it should hold now; a difference is
    /// recorded (the run goes on from what the source holds).
    /// True when it holds what it should.
    fn compare_source(&mut self, what: &str, expected: &BTreeMap<String, String>) -> bool {
        let now = match self.dumps_now() {
            Ok(now) => now,
            Err(e) => {
                self.record(format!("step {}: {what}: the source cannot be dumped: {e}", self.step));
                return false;
            }
        };
        let (e, a): (Vec<&String>, Vec<&String>) = (expected.keys().collect(), now.keys().collect());
        let mut problems = Vec::new();
        if a != e {
            problems.push(format!("databases: expected {e:?}, the source has {a:?}"));
        }
        for (db, d) in expected {
            if let Some(diff) = now.get(db).and_then(|n| dump_diff(d, n)) {
                problems.push(format!("pg_dump of {db}: {diff}"));
            }
        }
        if problems.is_empty() {
            return true;
        }
        self.record(format!("step {}: {what}: the source differs from what it should hold:\n  {}", self.step, problems.join("\n  ")));
        false
    }

    /// Runs `pgkeep restore` (which must succeed); returns the label of
    /// the backup it restored.
    fn run_restore(&mut self, args: &[String]) -> String {
        self.note(format!("pgkeep {}", args.join(" ")));
        let r = self.pk.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(r.status.success(), "pgkeep {} failed ({}): {}", args.join(" "), r.status, r.stderr);
        let label = r.stdout.split_whitespace().skip_while(|w| *w != "backup").nth(1);
        label.unwrap_or_else(|| panic!("pgkeep {} did not say which backup it restored: {}", args.join(" "), r.stdout)).to_owned()
    }

    /// Stops the source and restores an older backup into its own data
    /// directory (`--force`), to the end of that backup; it promotes to a new
    /// timeline and goes on archiving into the same stanza. When it does not
    /// start, that is recorded, and the restore is done again with
    /// `--target-timeline current` so that the run can go on.
    fn restore_in_place(&mut self) {
        self.drop_standby();
        let i = self.rng.below(self.backups.len() as u64) as usize;
        let label = self.backups[i].label.clone();
        self.note(format!("in-place restore of {label} (backup {} of {}, tl{})", i + 1, self.backups.len(), self.backups[i].timeline));
        self.close_wal("before an in-place restore");
        self.src.stop("fast");
        let data = self.src.data.to_str().unwrap().to_owned();
        let mut args: Vec<String> =
            ["restore", "--pg-data", &data, "--force", "--set", &label, "--target-immediate"].iter().map(|s| s.to_string()).collect();
        args.extend(Self::ts_map_args(&self.tablespaces));
        self.run_restore(&args);
        let what = format!("in-place restore of backup {label}");
        if let Err(e) = self.src.start() {
            self.record(format!("step {}: {what} (pgkeep {}): the source did not start: {e}", self.step, args.join(" ")));
            stop_if_running(&self.src.data, self.dir.path());
            args.extend(["--target-timeline".to_owned(), "current".to_owned()]);
            self.run_restore(&args);
            if let Err(e) = self.src.start() {
                self.record(format!("step {}: {what}, again with --target-timeline current: the source did not start: {e}", self.step));
                stop_if_running(&self.src.data, self.dir.path());
                return self.heal();
            }
        }
        self.timeline = self.src.conn.timeline();
        self.outcome(format!("promoted on timeline {}", self.timeline));
        let expected: BTreeMap<String, String> = self.backups[i].expected.dumps.iter().map(|(db, p)| (db.clone(), Self::load(p))).collect();
        self.base = Some(i);
        if !(self.compare_source(&what, &expected) & self.check_source(&what)) {
            self.heal();
        }
    }

    /// Stops and retires the source; a restore of the end of the archive
    /// into a new directory becomes the source (a new timeline, archiving
    /// into the same stanza). When it does not start, that is recorded and
    /// it is restored again, with `--set` of the newest backup on the
    /// source's history, and failing that from the newest full backup of a
    /// sound source (`--target-immediate --target-timeline current`), so
    /// that the run can go on.
    fn promote_new_dir(&mut self) {
        self.drop_standby();
        self.note("promote a restored copy in a new directory; retire the source");
        self.close_wal("before retiring this source");
        let before = self.dumps_now().unwrap_or_else(|e| panic!("the source cannot be dumped: {e}"));
        self.src.stop("fast");
        self.generation += 1;
        let g = self.generation;
        let data = self.dir.join(&format!("src{g}"));
        let map: Vec<(String, PathBuf)> = self.tablespaces.iter().map(|(n, _)| (n.clone(), self.dir.join(&format!("{n}-g{g}")))).collect();
        let args = |set: Option<&str>, extra: &[&str]| {
            // The copy becomes the source: it archives into the stanza.
            let mut args: Vec<String> = vec![
                "restore".into(),
                "--pg-data".into(),
                data.to_str().unwrap().into(),
                "--force".into(),
                "--archive-mode".into(),
                "preserve".into(),
            ];
            if let Some(label) = set {
                args.extend(["--set".to_owned(), label.to_owned()]);
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            args.extend(Self::ts_map_args(&map));
            args
        };
        // (restore arguments, the backup it builds on, the state it must hold)
        let mut attempts: Vec<(Vec<String>, Option<usize>, Option<usize>)> = Vec::new();
        let first = if self.rng.chance(0.5) { self.base } else { None };
        attempts.push((args(first.map(|i| self.backups[i].label.as_str()), &[]), first, None));
        if first.is_none() {
            if let Some(b) = self.base {
                attempts.push((args(Some(&self.backups[b].label), &[]), Some(b), None));
            }
        }
        if let Some(f) = self.backups.iter().rposition(|b| b.kind == "full" && b.tainted.is_none()) {
            attempts.push((args(Some(&self.backups[f].label), &["--target-immediate", "--target-timeline", "current"]), Some(f), Some(f)));
        }
        let new = Server {
            data: data.clone(),
            conn: Conn { port: free_port(), log: self.dir.join(&format!("src{g}.log")), ..self.src.conn.clone() },
        };
        let mut started = None;
        for (n, (args, set, state)) in attempts.iter().enumerate() {
            if n > 0 {
                stop_if_running(&data, self.dir.path());
            }
            let restored = self.run_restore(args);
            match new.start() {
                Ok(()) => {
                    started = Some((*set, *state, restored));
                    break;
                }
                Err(e) => self.record(format!(
                    "step {}: restore into a new directory (pgkeep {}): it did not start: {e}",
                    self.step,
                    args.join(" ")
                )),
            }
        }
        let Some((set, state, restored)) = started else {
            panic!("restore into a new directory: no attempt started (see the problems before)")
        };
        let old = std::mem::replace(&mut self.src, new);
        self.pk.write_config(&self.src.addr(), &self.repo);
        self.timeline = self.src.conn.timeline();
        self.outcome(format!("{} promoted on timeline {}; {} retired", self.src.data.display(), self.timeline, old.data.display()));
        remove_path(&old.data);
        for (_, d) in std::mem::replace(&mut self.tablespaces, map) {
            remove_path(&d);
        }
        // Without --set, pgkeep chose the newest backup in the past of the
        // latest timeline, which need not be the newest backup taken (that
        // one may be on a branch an in-place restore abandoned).
        self.base = set.or_else(|| self.backups.iter().position(|b| b.label == restored));
        let (what, expected) = match state {
            None => ("the restored copy that became the source (end of the archive)".to_owned(), before),
            Some(f) => (
                format!("the restored copy that became the source (full backup {})", self.backups[f].label),
                self.backups[f].expected.dumps.iter().map(|(db, p)| (db.clone(), Self::load(p))).collect(),
            ),
        };
        if !(self.compare_source(&what, &expected) & self.check_source(&what)) {
            self.heal();
        }
    }

    // ------------------------------------------------------------ checks

    /// Restores into a new directory with `args`, starts it and checks it
    /// against `expected`; the copy is removed afterwards.
    fn check_restore(&mut self, args: &[String], expected: &Expected, inherited: &[String]) -> Result<(), String> {
        self.checks += 1;
        let n = self.checks;
        let target = self.dir.join(&format!("check{n}"));
        let map: Vec<(String, PathBuf)> =
            self.tablespaces.iter().map(|(t, _)| (t.clone(), self.dir.join(&format!("check{n}-{t}")))).collect();
        let mut all: Vec<String> = vec!["restore".into(), "--pg-data".into(), target.to_str().unwrap().into()];
        all.extend(args.iter().cloned());
        all.extend(Self::ts_map_args(&map));
        let result = self.check_restore_in(&all, &target, expected, inherited);
        stop_if_running(&target, self.dir.path());
        remove_path(&target);
        remove_path(&self.dir.join(&format!("check{n}.log")));
        for (_, d) in map {
            remove_path(&d);
        }
        result
    }

    /// `inherited`: pg_visibility findings the source itself had then (the
    /// copy must have them too; they are not its fault).
    fn check_restore_in(&self, args: &[String], target: &Path, expected: &Expected, inherited: &[String]) -> Result<(), String> {
        let r = self.pk.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !r.status.success() {
            return Err(format!("pgkeep {} failed ({}): {}", args.join(" "), r.status, r.stderr.trim()));
        }
        let cluster = catch_unwind(AssertUnwindSafe(|| Cluster::start_restored(&self.dir, target)))
            .map_err(|e| format!("the restored cluster did not start and promote: {}", panic_text(e)))?;
        let conn = Conn::of_cluster(&cluster, self.dir.path());
        let mut problems = Vec::new();

        let dbs = conn.databases();
        let want: Vec<&String> = expected.dumps.iter().map(|(db, _)| db).collect();
        if dbs.iter().collect::<Vec<_>>() != want {
            problems.push(format!("databases: the source had {want:?}, the restored cluster has {dbs:?}"));
        }
        for (db, path) in &expected.dumps {
            if !dbs.contains(db) {
                continue;
            }
            match conn.dump(db) {
                Ok(d) => {
                    if let Some(diff) = dump_diff(&Self::load(path), &d) {
                        problems.push(format!("pg_dump of {db}: {diff}"));
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        problems.extend(conn.amcheck());
        let vis: Vec<String> = conn.visibility_all(1000).into_iter().filter(|v| !inherited.contains(v)).collect();
        if !vis.is_empty() {
            problems.push(format!("pg_visibility:\n    {}", first_lines(&vis.join("\n"), 20).replace('\n', "\n    ")));
        }
        match catch_unwind(AssertUnwindSafe(|| cluster.stop_clean())) {
            Ok(()) => {
                let r = run(as_postgres(pg_tool("pg_checksums"), self.dir.path()).arg("--check").arg("-D").arg(target), SQL_TIMEOUT);
                if r.stderr.contains("must be shut down") {
                    problems.push(format!(
                        "pg_checksums not run: the cluster did not shut down cleanly:\n--- server log:\n{}",
                        tail(&conn.log, 15)
                    ));
                } else if !r.status.success() {
                    problems.push(format!(
                        "pg_checksums --check ({}):\n{}\n{}",
                        r.status,
                        first_lines(&r.stdout, 20),
                        first_lines(&r.stderr, 20)
                    ));
                }
            }
            Err(e) => problems.push(format!("clean stop failed: {}", panic_text(e))),
        }
        drop(cluster);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n  "))
        }
    }

    /// Restores and checks every backup, then (when the run finished) every
    /// time mark; failures are collected.
    fn verify_all(&mut self, marks_too: bool) {
        let t0 = Instant::now();
        eprintln!("torture: checking {} backups and {} time marks", self.backups.len(), if marks_too { self.marks.len() } else { 0 });
        for i in 0..self.backups.len() {
            let b = &self.backups[i];
            let what = format!(
                "backup {} (--type {} stored as {}, prior {}, timeline {}, taken at step {})",
                b.label, b.asked, b.kind, b.prior, b.timeline, b.step
            );
            let args: Vec<String> = vec!["--set".into(), b.label.clone(), "--target-immediate".into()];
            let expected = b.expected.clone();
            let source_vis = b.source_visibility.clone();
            let tainted = b.tainted;
            eprintln!("torture: check {what}");
            if let Err(e) = self.check_restore(&args, &expected, &source_vis) {
                let mut msg = format!("{what}: restore {}:\n  {e}", args.join(" "));
                if !source_vis.is_empty() {
                    let _ = write!(msg, "\n  ({} pg_visibility findings the source itself had are not counted)", source_vis.len());
                }
                if let Some(step) = tainted.filter(|_| !e.contains("did not start")) {
                    let _ = write!(msg, "\n  (INHERITED? the source was found unsound at step {step}, before this backup)");
                }
                eprintln!("torture: FAILED {msg}");
                self.failures.push(msg);
            }
        }
        if marks_too {
            let last_tl = self.timeline;
            for i in 0..self.marks.len() {
                let m = &self.marks[i];
                let mut args: Vec<String> = vec!["--target-time".into(), m.time.clone()];
                if let Some(b) = m.set {
                    args.extend(["--set".to_owned(), self.backups[b].label.clone()]);
                }
                if m.timeline != last_tl {
                    args.extend(["--target-timeline".to_owned(), m.timeline.to_string()]);
                }
                let what = format!("time mark {} (step {}, timeline {})", m.time, m.step, m.timeline);
                let expected = m.expected.clone();
                let source_vis = m.source_visibility.clone();
                let tainted = m.tainted;
                eprintln!("torture: check {what}");
                if let Err(e) = self.check_restore(&args, &expected, &source_vis) {
                    let mut msg = format!("{what}: restore {}:\n  {e}", args.join(" "));
                    if let Some(step) = tainted.filter(|_| !e.contains("did not start")) {
                        let _ = write!(msg, "\n  (INHERITED? the source was found unsound at step {step}, before this mark)");
                    }
                    eprintln!("torture: FAILED {msg}");
                    self.failures.push(msg);
                }
            }
        }
        let r = self.pk.run(&["verify"]);
        if !r.status.success() {
            self.failures.push(format!("pgkeep verify failed ({}): {}{}", r.status, r.stdout, r.stderr));
        }
        eprintln!("torture: checks took {:.0?}", t0.elapsed());
    }
}

#[test]
fn torture() {
    let seed = match std::env::var("TORTURE_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("TORTURE_SEED={s:?}: {e}")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_000_000,
    };
    let steps = match std::env::var("TORTURE_STEPS") {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("TORTURE_STEPS={s:?}: {e}")),
        Err(_) => DEFAULT_STEPS,
    };
    eprintln!("torture: seed {seed}, {steps} steps (replay: TORTURE_SEED={seed} TORTURE_STEPS={steps})");

    let mut t = match catch_unwind(|| Torture::setup(seed, steps)) {
        Ok(t) => t,
        Err(e) => panic!("torture setup failed (seed {seed}, TORTURE_SEED={seed} TORTURE_STEPS={steps}): {}", panic_text(e)),
    };
    let ops = catch_unwind(AssertUnwindSafe(|| t.run_ops()));
    let ops_ok = ops.is_ok();
    let ops_secs = t.started.elapsed();
    if let Err(e) = ops {
        let msg = format!("step {} (the operations stopped here): {}", t.step, panic_text(e));
        eprintln!("torture: FAILED {msg}");
        t.failures.push(msg);
    }
    eprintln!("torture: {} operations took {ops_secs:.0?}; {} backups, {} time marks", t.step.min(steps), t.backups.len(), t.marks.len());
    t.verify_all(ops_ok);
    let problems = std::mem::take(&mut t.failures);
    eprintln!("torture: seed {seed}: {} problem(s), {:.0?} in all", problems.len(), t.started.elapsed());
    if !problems.is_empty() {
        panic!("{}", t.report(&problems));
    }
}
