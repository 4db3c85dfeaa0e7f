//! Test harness: real PostgreSQL clusters, a pgkeep runner, and real object
//! store servers (moto for S3, Azurite for Azure Blob, fake-gcs-server for
//! GCS reads), each cleaned up on drop.
//!
//! Facts this rests on (see shared/TESTING.md): PostgreSQL refuses to run as
//! root, so every PostgreSQL program, and pgkeep itself (as a production
//! install and `archive_command` do), runs as `postgres` (through `setpriv`,
//! which execs in place, so killing the child kills the program itself).
//! Tests live in a directory under /tmp owned by `postgres`, and pgkeep is
//! copied there because `archive_command` runs it as `postgres`, who cannot
//! reach the cargo target directory when it lives under /root.
//!
//! Environment knobs:
//! - `PGKEEP_TEST_PG_MAJOR`: the PostgreSQL major the tests run (15, 16, 17
//!   or 18; default: the newest `/usr/lib/postgresql/*/bin`, Debian 12's 15),
//!   from Debian's directory or `/opt/pgkeep-test/pg<major>/bin`
//!   (scripts/install-postgres);
//! - `PGKEEP_TEST_PG_BIN`: PostgreSQL's bin directory, overriding the above;
//! - `PGKEEP_TEST_MOTO`: the `moto_server` program (default
//!   `/opt/pgkeep-test/venv/bin/moto_server`, installed by scripts/test-setup);
//! - `PGKEEP_TEST_AZURITE`: the `azurite-blob` program (default
//!   `/opt/pgkeep-test/azurite/node_modules/.bin/azurite-blob`);
//! - `PGKEEP_TEST_FAKE_GCS`: the `fake-gcs-server` program (default
//!   `/opt/pgkeep-test/bin/fake-gcs-server`);
//! - `PGKEEP_TEST_KEEP=1`: keep test directories (their path is printed).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long one pgkeep command may take before the test fails.
pub const PGKEEP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a quick SQL statement may take.
const SQL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restored cluster may take to recover and promote.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long archiving one segment may take.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- processes

/// What a finished command gave back.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with stdin closed, failing the test if it takes
/// longer than `timeout` (a hung engine must not hang CI).
pub fn run(cmd: &mut Command, timeout: Duration) -> Run {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!("timed out after {timeout:?}: {what}\nstderr: {stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Like [`run`], and also the peak resident set size of the process
/// started, in KiB, as GNU time reports it (`%M`: the `ru_maxrss` that
/// `wait4(2)` gives for that one child; `setpriv`, which [`as_postgres`]
/// starts, executes the program in the same process).
pub fn run_measured(cmd: &mut Command, timeout: Duration) -> (Run, u64) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-f").arg("%M").arg("-o").arg(report.path()).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        timed.current_dir(d);
    }
    let r = run(&mut timed, timeout);
    let text = std::fs::read_to_string(report.path()).unwrap();
    let peak = text.lines().last().and_then(|l| l.trim().parse().ok());
    (r, peak.unwrap_or_else(|| panic!("/usr/bin/time reported no peak RSS: {text:?}")))
}

/// Like [`run`], and the command must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let what = format!("{cmd:?}");
    let r = run(cmd, timeout);
    assert!(r.status.success(), "{what} failed ({}):\nstdout: {}\nstderr: {}", r.status, r.stdout, r.stderr);
    r.stdout
}

/// A PostgreSQL program (`initdb`, `psql`, ...) from the server's bin directory.
pub fn pg_tool(name: &str) -> PathBuf {
    pg_bin().join(name)
}

/// The bin directory of the PostgreSQL the tests run: `PGKEEP_TEST_PG_BIN`,
/// else that of `PGKEEP_TEST_PG_MAJOR` ([`pg_bin_of`]), else Debian's newest.
pub fn pg_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGKEEP_TEST_PG_BIN") {
            return PathBuf::from(dir);
        }
        if let Some(major) = std::env::var("PGKEEP_TEST_PG_MAJOR").ok().filter(|m| !m.is_empty()) {
            let major = major.parse().unwrap_or_else(|_| panic!("PGKEEP_TEST_PG_MAJOR={major:?} is not a major version"));
            return pg_bin_of(major);
        }
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .filter(|(_, p)| p.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop().map(|(_, p)| p).expect("PostgreSQL server binaries not found under /usr/lib/postgresql: run scripts/test-setup")
    })
    .clone()
}

/// The bin directory of PostgreSQL `major`: Debian's own
/// (`/usr/lib/postgresql/<major>/bin`, 15 on Debian 12), else the one
/// `scripts/install-postgres` put in `/opt/pgkeep-test/pg<major>/bin`.
pub fn pg_bin_of(major: u32) -> PathBuf {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("postgres").exists() {
        return debian;
    }
    let bin = PathBuf::from(format!("/opt/pgkeep-test/pg{major}/bin"));
    assert!(
        bin.join("postgres").exists(),
        "PostgreSQL {major} not found at {} nor {}: run scripts/test-setup",
        debian.display(),
        bin.display()
    );
    bin
}

/// The major version of the PostgreSQL the tests run ([`pg_bin`]).
pub fn pg_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = run_ok(Command::new(pg_tool("initdb")).arg("--version"), SQL_TIMEOUT);
        // "initdb (PostgreSQL) 18.6"
        let version = out.split_whitespace().last().unwrap_or_default();
        version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("cannot read the major of {out:?}"))
    })
}

/// `initdb` arguments for a cluster without data checksums: none where
/// that is `initdb`'s default (before PostgreSQL 18), else
/// `--no-data-checksums`.
pub fn initdb_without_checksums() -> &'static [&'static str] {
    let major = pgkeep_core::pg::version::of_major(pg_major()).expect("the tests run a supported PostgreSQL");
    if major.checksums_by_default {
        &["--no-data-checksums"]
    } else {
        &[]
    }
}

/// `program` run as the `postgres` user, from `cwd` (which that user can
/// enter: the cargo working directory may be under /root).
pub fn as_postgres(program: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
    c.current_dir(cwd).env("HOME", cwd);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("PG")) {
            c.env_remove(k);
        }
    }
    c
}

/// Removes the object store variables `cmd` would inherit from the test's
/// own environment (a developer's credentials must not leak into a test),
/// then sets `env`.
fn apply_env<'a>(cmd: &'a mut Command, env: &[(String, String)]) -> &'a mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| ["AWS_", "AZURE_", "AZURITE_", "GOOGLE_"].iter().any(|p| k.starts_with(p))) {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
}

fn chown_postgres(path: &Path) {
    run_ok(Command::new("chown").arg("-R").arg("postgres:postgres").arg(path), SQL_TIMEOUT);
}

/// A TCP port nobody listens on and that this process has not handed out.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let fresh = HANDED_OUT.lock().unwrap().insert(port);
        if fresh && TcpStream::connect(("127.0.0.1", port)).is_err() {
            return port;
        }
    }
}

/// The last `n` lines of a file (a server log), for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------- test dir

/// A directory under /tmp owned by `postgres`, holding a copy of the pgkeep
/// binary. On drop it stops every PostgreSQL still running in it, then
/// removes it (unless `PGKEEP_TEST_KEEP=1`).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new().prefix(&format!("pgkeep-{name}-")).tempdir_in("/tmp").expect("create test dir");
        let path = dir.path().to_owned();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = path.join("pgkeep");
        std::fs::copy(env!("CARGO_BIN_EXE_pgkeep"), &bin).expect("copy the pgkeep binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        chown_postgres(&path);
        eprintln!("test dir: {}", path.display());
        TestDir { dir: Some(dir), path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name` (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The copy of pgkeep that PostgreSQL can run.
    pub fn pgkeep_bin(&self) -> PathBuf {
        self.path.join("pgkeep")
    }

    /// A new empty directory `path/name` owned by postgres.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::create_dir_all(&p).unwrap();
        chown_postgres(&p);
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // A cluster whose owner panicked before dropping it, or one started
        // behind the harness's back: stop anything with a postmaster.pid here.
        for entry in std::fs::read_dir(&self.path).into_iter().flatten().flatten() {
            let data = entry.path();
            if data.join("postmaster.pid").exists() {
                stop_immediate(&pg_bin(), &data, &self.path);
            }
        }
        let dir = self.dir.take().unwrap();
        if std::env::var_os("PGKEEP_TEST_KEEP").is_some_and(|v| v == "1") {
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

fn stop_immediate(bin: &Path, data: &Path, cwd: &Path) {
    let _ = run(as_postgres(bin.join("pg_ctl"), cwd).arg("-D").arg(data).args(["-m", "immediate", "-w", "stop"]), SQL_TIMEOUT);
}

// ---------------------------------------------------------------- repositories

/// A repository as written into the pgkeep config.
#[derive(Clone, Debug)]
pub enum Repo {
    Local(PathBuf),
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
    },
    /// Azure Blob at a custom endpoint (Azurite's), with the account and
    /// key given in the environment as a production install would.
    Azure {
        endpoint: String,
        container: String,
        prefix: String,
    },
}

impl Repo {
    /// A local repository at `dir/name`, owned by postgres (archive-push runs
    /// as postgres).
    pub fn local(dir: &TestDir, name: &str) -> Repo {
        Repo::Local(dir.mkdir(name))
    }

    /// The `[[repo]]` table.
    pub fn toml(&self) -> String {
        match self {
            Repo::Local(p) => format!("[[repo]]\nlocation = \"{}\"\ncompress = \"zstd\"\n", p.display()),
            Repo::S3 { endpoint, bucket, prefix } => format!(
                "[[repo]]\nlocation = \"s3://{bucket}/{prefix}\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n\
                 path-style = true\naccess-key-id = \"test\"\nsecret-access-key = \"test\"\ncompress = \"zstd\"\n"
            ),
            Repo::Azure { endpoint, container, prefix } => {
                format!("[[repo]]\nlocation = \"az://{container}/{prefix}\"\nendpoint = \"{endpoint}\"\ncompress = \"zstd\"\n")
            }
        }
    }

    /// Environment variables pgkeep needs for this repository (credentials
    /// that the config file does not hold).
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Repo::Azure { .. } => Azurite::credentials(),
            Repo::Local(_) | Repo::S3 { .. } => Vec::new(),
        }
    }

    /// The directory of a local repository.
    pub fn path(&self) -> &Path {
        match self {
            Repo::Local(p) => p,
            Repo::S3 { .. } | Repo::Azure { .. } => panic!("not a local repository"),
        }
    }
}

/// Every file under `dir` (recursively) with its bytes; empty when `dir`
/// does not exist. Compare two snapshots to prove a command wrote nothing.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_owned(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Fails unless `dir` is absent or an empty directory.
pub fn assert_absent_or_empty(dir: &Path) {
    if dir.exists() {
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{} should be absent or empty, holds {left:?}", dir.display());
    }
}

/// Files under `dir` whose name ends with `suffix`, largest first.
pub fn files_by_size(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<(u64, PathBuf)> = snapshot(dir)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().ends_with(suffix))
        .map(|(p, bytes)| (bytes.len() as u64, dir.join(p)))
        .collect();
    files.sort_by(|a, b| b.cmp(a));
    files.into_iter().map(|(_, p)| p).collect()
}

// ---------------------------------------------------------------- pgkeep

/// Runs the test dir's copy of pgkeep as postgres with `--config` and `--stanza`.
#[derive(Clone)]
pub struct Pgkeep {
    bin: PathBuf,
    cwd: PathBuf,
    pub config: PathBuf,
    pub stanza: String,
    /// Environment for pgkeep and for the PostgreSQL servers that run it
    /// from `archive_command` and `restore_command`.
    pub env: Vec<(String, String)>,
}

impl Pgkeep {
    /// A runner for config file `dir/<config_name>.toml` (not written yet).
    pub fn new(dir: &TestDir, config_name: &str, stanza: &str) -> Pgkeep {
        Pgkeep {
            bin: dir.pgkeep_bin(),
            cwd: dir.path().to_owned(),
            config: dir.join(&format!("{config_name}.toml")),
            stanza: stanza.to_owned(),
            env: Vec::new(),
        }
    }

    /// The same config file with another `--stanza`.
    pub fn with_stanza(&self, stanza: &str) -> Pgkeep {
        Pgkeep { stanza: stanza.to_owned(), ..self.clone() }
    }

    /// The same runner with these environment variables added.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Pgkeep {
        self.env.extend(env);
        self
    }

    /// `cmd` with the inherited object store variables removed and this
    /// runner's environment set.
    fn apply_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        apply_env(cmd, &self.env)
    }

    /// Writes the config: this stanza on the given server, one repository.
    pub fn write_config(&self, pg: &PgAddr, repo: &Repo) {
        self.write_raw_config(&self.config_text(pg, repo));
    }

    /// The text [`Pgkeep::write_config`] writes.
    pub fn config_text(&self, pg: &PgAddr, repo: &Repo) -> String {
        format!(
            "[stanza.{}]\npg-data = \"{}\"\npg-host = \"{}\"\npg-port = {}\npg-user = \"postgres\"\n\n{}",
            self.stanza,
            pg.data.display(),
            pg.socket_dir.display(),
            pg.port,
            repo.toml()
        )
    }

    /// Writes `text` as the config file, readable by postgres.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
        std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// What PostgreSQL runs to archive a segment.
    pub fn archive_command(&self) -> String {
        format!("{} --config {} --stanza {} archive-push %p", self.bin.display(), self.config.display(), self.stanza)
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let start = Instant::now();
        let r = run(&mut self.command(args), PGKEEP_TIMEOUT);
        eprintln!("pgkeep {} -> {} in {:.1?}", args.join(" "), r.status, start.elapsed());
        if !r.status.success() {
            eprintln!("  stderr: {}", r.stderr.trim_end());
        }
        r
    }

    /// Runs and requires success; returns stdout and the peak resident
    /// set size of the pgkeep process, in KiB (see [`run_measured`]).
    pub fn ok_measured(&self, args: &[&str]) -> (String, u64) {
        let start = Instant::now();
        let (r, peak) = run_measured(&mut self.command(args), PGKEEP_TIMEOUT);
        eprintln!("pgkeep {} -> {} in {:.1?}, peak RSS {} KiB", args.join(" "), r.status, start.elapsed(), peak);
        assert!(r.status.success(), "pgkeep {args:?} failed ({}):\nstdout: {}\nstderr: {}", r.status, r.stdout, r.stderr);
        (r.stdout, peak)
    }

    /// The command that runs pgkeep with `args`.
    pub fn command(&self, args: &[&str]) -> Command {
        // As postgres, like archive_command and a production install: a
        // local repository must stay writable by PostgreSQL's archive-push.
        let mut c = as_postgres(&self.bin, &self.cwd);
        c.arg("--config").arg(&self.config).arg("--stanza").arg(&self.stanza).args(args).current_dir(&self.cwd);
        for k in ["PGKEEP_CONFIG", "PGKEEP_STANZA"] {
            c.env_remove(k);
        }
        // The PostgreSQL the tests run comes first on the PATH, where
        // `verify --restore` looks for the server of a major that is not
        // installed the Debian way.
        let path = std::env::var_os("PATH").unwrap_or_default();
        c.env("PATH", std::env::join_paths(std::iter::once(pg_bin()).chain(std::env::split_paths(&path))).unwrap());
        self.apply_env(&mut c);
        c
    }

    /// Starts pgkeep in the background (output discarded); killed with
    /// SIGKILL when dropped.
    pub fn spawn(&self, args: &[&str]) -> Background {
        self.spawn_with(args, Stdio::null())
    }

    /// [`Pgkeep::spawn`] keeping its stderr, for [`Background::finish`].
    pub fn spawn_piped(&self, args: &[&str]) -> Background {
        self.spawn_with(args, Stdio::piped())
    }

    fn spawn_with(&self, args: &[&str], stderr: Stdio) -> Background {
        let mut c = as_postgres(&self.bin, &self.cwd);
        c.arg("--config").arg(&self.config).arg("--stanza").arg(&self.stanza).args(args);
        self.apply_env(&mut c);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        Background { child: Some(c.spawn().expect("start pgkeep")), what: format!("pgkeep {}", args.join(" ")) }
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.status.success(), "pgkeep {args:?} failed ({}):\nstdout: {}\nstderr: {}", r.status, r.stdout, r.stderr);
        r.stdout
    }

    /// Runs and requires failure reported as exactly one non-empty line on
    /// stderr, without a panic; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        self.fails_code(args).1
    }

    /// [`Pgkeep::fails`], also returning the exit code.
    pub fn fails_code(&self, args: &[&str]) -> (i32, String) {
        let r = self.run(args);
        let code = r.status.code().unwrap_or_else(|| panic!("pgkeep {args:?} was killed by a signal ({}): {}", r.status, r.stderr));
        assert_ne!(code, 0, "pgkeep {args:?} should have failed:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        let line = r.stderr.strip_suffix('\n').unwrap_or(&r.stderr);
        assert!(
            !line.trim().is_empty() && !line.contains('\n') && !line.contains("panicked"),
            "pgkeep {args:?} must fail with one line on stderr, gave:\n{}",
            r.stderr
        );
        (code, line.to_owned())
    }
}

/// Where a server is: what the pgkeep config needs.
#[derive(Clone, Debug)]
pub struct PgAddr {
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
}

// ---------------------------------------------------------------- clusters

/// A running PostgreSQL cluster in a test dir, stopped (immediate) on drop.
pub struct Cluster {
    pub addr: PgAddr,
    /// The bin directory of its PostgreSQL.
    bin: PathBuf,
    cwd: PathBuf,
    log: PathBuf,
    /// The server's environment, which `archive_command` and
    /// `restore_command` inherit.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// `initdb -k` at `dir/name` and start it. With `archive_to`, WAL is
    /// archived by that pgkeep config and stanza; without, archiving is off.
    pub fn new(dir: &TestDir, name: &str, archive_to: Option<&Pgkeep>) -> Cluster {
        Cluster::new_with_initdb(dir, name, archive_to, &["-k"])
    }

    /// Starts a directory that `pgkeep restore` wrote, as its own server
    /// (never archiving into the source's repository), and waits until
    /// recovery has finished and the server is promoted.
    pub fn start_restored(dir: &TestDir, data: &Path) -> Cluster {
        let c = Cluster::start_recovery(dir, data);
        c.wait_promoted();
        c
    }

    /// [`Cluster::start_restored`] with `pk`'s environment, which its
    /// `restore_command` needs when the repository's credentials come from
    /// the environment.
    pub fn start_restored_with(dir: &TestDir, data: &Path, pk: &Pgkeep) -> Cluster {
        let c = Cluster::start_restored_dir(dir, data, false, &pk.env);
        c.wait_promoted();
        c
    }

    /// Starts a restored directory and returns as soon as it takes
    /// connections (it may still be in recovery).
    pub fn start_recovery(dir: &TestDir, data: &Path) -> Cluster {
        Cluster::start_restored_dir(dir, data, false, &[])
    }

    /// Starts a restored directory as the stanza's new primary: it keeps the
    /// source's `archive_command`, so after promotion it archives its new
    /// timeline into the same repository. Waits until it is promoted.
    pub fn start_restored_archiving(dir: &TestDir, data: &Path) -> Cluster {
        let c = Cluster::start_restored_dir(dir, data, true, &[]);
        c.wait_promoted();
        c
    }

    fn start_restored_dir(dir: &TestDir, data: &Path, archive: bool, env: &[(String, String)]) -> Cluster {
        Cluster::start_restored_bin(dir, data, archive, env, &pg_bin())
    }

    /// Starts a restored directory with the PostgreSQL of `bin`, as
    /// [`Cluster::start_recovery`] does, and waits until it is promoted.
    pub fn start_restored_of(dir: &TestDir, data: &Path, bin: &Path) -> Cluster {
        let c = Cluster::start_restored_bin(dir, data, false, &[], bin);
        c.wait_promoted();
        c
    }

    fn start_restored_bin(dir: &TestDir, data: &Path, archive: bool, env: &[(String, String)], bin: &Path) -> Cluster {
        chown_postgres(data);
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let name = data.file_name().unwrap().to_string_lossy().into_owned();
        let port = free_port();
        let c = Cluster {
            bin: bin.to_owned(),
            addr: PgAddr { data: data.to_owned(), socket_dir: dir.path().to_owned(), port },
            cwd: dir.path().to_owned(),
            log: dir.join(&format!("{name}.log")),
            env: env.to_vec(),
        };
        let archive_mode = if archive { "on" } else { "off" };
        let opts = format!(
            "-c archive_mode={archive_mode} -c port={port} -c unix_socket_directories={} -c listen_addresses=",
            dir.path().display()
        );
        c.pg_ctl_start(&["-o", &opts]);
        c
    }

    pub fn pg_ctl_start(&self, extra: &[&str]) {
        let t = RECOVERY_TIMEOUT.as_secs().to_string();
        let r = run(
            apply_env(&mut as_postgres(self.tool("pg_ctl"), &self.cwd), &self.env)
                .arg("-D")
                .arg(&self.addr.data)
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t", &t])
                .args(extra)
                .arg("start"),
            RECOVERY_TIMEOUT + Duration::from_secs(30),
        );
        assert!(
            r.status.success(),
            "PostgreSQL at {} did not start: {}\n--- server log:\n{}",
            self.addr.data.display(),
            r.stdout,
            tail(&self.log, 40)
        );
    }

    /// Waits until `pg_is_in_recovery()` is false.
    pub fn wait_promoted(&self) {
        self.wait_for("promotion (still in recovery)", "select pg_is_in_recovery()", |s| s == "f");
    }

    /// Polls `sql` until `done` holds for its output, for at most
    /// [`RECOVERY_TIMEOUT`]; fails at once if the server stops meanwhile.
    pub fn wait_for(&self, what: &str, sql: &str, done: impl Fn(&str) -> bool) {
        let start = Instant::now();
        loop {
            let r = run(&mut self.psql_cmd(sql), SQL_TIMEOUT);
            if r.status.success() && done(r.stdout.trim()) {
                return;
            }
            assert!(
                self.addr.data.join("postmaster.pid").exists(),
                "{} stopped while waiting for {what}:\n--- server log:\n{}",
                self.addr.data.display(),
                tail(&self.log, 40)
            );
            assert!(
                start.elapsed() < RECOVERY_TIMEOUT,
                "{}: no {what} after {RECOVERY_TIMEOUT:?} ({:?} {}):\n--- server log:\n{}",
                self.addr.data.display(),
                r.stdout.trim(),
                r.stderr.trim(),
                tail(&self.log, 40)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    fn psql_cmd(&self, sql: &str) -> Command {
        let mut c = as_postgres(self.tool("psql"), &self.cwd);
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-h"]).arg(&self.addr.socket_dir).args([
            "-p",
            &self.addr.port.to_string(),
            "-c",
            sql,
        ]);
        c
    }

    /// A function that runs `sql` and returns its output (empty on
    /// failure), for a sampling thread.
    pub fn psql_command(&self, sql: &str) -> impl Fn() -> String + Send + 'static {
        let (cwd, socket, port, sql, psql) =
            (self.cwd.clone(), self.addr.socket_dir.clone(), self.addr.port, sql.to_owned(), self.tool("psql"));
        move || {
            let mut c = as_postgres(&psql, &cwd);
            c.args(["-X", "-A", "-t", "-q", "-d", "postgres", "-h"]).arg(&socket).args(["-p", &port.to_string(), "-c", &sql]);
            let r = run(&mut c, SQL_TIMEOUT);
            if r.status.success() {
                r.stdout.trim().to_owned()
            } else {
                String::new()
            }
        }
    }

    /// Runs SQL; returns its unaligned, tuples-only output, trimmed.
    pub fn psql(&self, sql: &str) -> String {
        let r = run(&mut self.psql_cmd(sql), SQL_TIMEOUT);
        assert!(r.status.success(), "psql {sql:?} failed: {}\n--- server log:\n{}", r.stderr, tail(&self.log, 20));
        r.stdout.trim().to_owned()
    }

    /// `select count(*) from <table>`.
    pub fn count(&self, table: &str) -> i64 {
        self.psql(&format!("select count(*) from {table}")).parse().unwrap()
    }

    fn pgbench_cmd(&self) -> Command {
        let mut c = as_postgres(self.tool("pgbench"), &self.cwd);
        c.arg("-h").arg(&self.addr.socket_dir).args(["-p", &self.addr.port.to_string()]);
        c
    }

    pub fn pgbench_init(&self, scale: u32) {
        run_ok(self.pgbench_cmd().args(["-i", "-q", "-s", &scale.to_string(), "postgres"]), Duration::from_secs(300));
    }

    pub fn pgbench(&self, seconds: u32, clients: u32) {
        run_ok(self.pgbench_cmd().args(pgbench_run_args(seconds, clients).iter()), Duration::from_secs(u64::from(seconds) + 120));
    }

    /// pgbench in the background; wait for it with [`Background::wait_ok`].
    pub fn pgbench_background(&self, seconds: u32, clients: u32) -> Background {
        let child = self
            .pgbench_cmd()
            .args(pgbench_run_args(seconds, clients).iter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgbench");
        Background { child: Some(child), what: "pgbench".into() }
    }

    /// pg_dump of database `postgres`, without the random `\restrict` /
    /// `\unrestrict` lines that pg_dump 15.14+ writes.
    pub fn dump(&self) -> String {
        self.dump_db("postgres")
    }

    /// pg_amcheck of every database (installing amcheck where missing; do it
    /// after any dump you compare); fails the test on any finding.
    pub fn amcheck(&self) {
        let (clean, out) = self.try_amcheck();
        assert!(clean, "pg_amcheck found problems in {}:\n{out}", self.addr.data.display());
    }

    /// Forces a WAL switch; returns the name of the segment it completed.
    /// Write something first, or there may be nothing to switch.
    pub fn switch_wal(&self) -> String {
        self.psql("select pg_walfile_name(pg_switch_wal())")
    }

    /// Name of the segment being written now.
    pub fn current_segment(&self) -> String {
        self.psql("select pg_walfile_name(pg_current_wal_lsn())")
    }

    /// Waits until PostgreSQL reports `segment` (or a later one) archived.
    pub fn wait_archived(&self, segment: &str) {
        let start = Instant::now();
        loop {
            let row = self.psql("select coalesce(last_archived_wal, ''), coalesce(last_failed_wal, '') from pg_stat_archiver");
            let (archived, failed) = row.split_once('|').unwrap();
            if archived.len() == 24 && archived >= segment {
                return;
            }
            assert!(
                start.elapsed() < ARCHIVE_TIMEOUT,
                "{segment} not archived after {ARCHIVE_TIMEOUT:?} (last archived {archived:?}, last failed {failed:?})\n--- server log:\n{}",
                tail(&self.log, 30)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the archiver has nothing left to push (no `.ready` file
    /// in `pg_wal/archive_status`): a backup returns once its last segment
    /// is archived, and its history file follows it a moment later.
    pub fn wait_archiver_idle(&self) {
        let status = self.addr.data.join("pg_wal/archive_status");
        let start = Instant::now();
        while std::fs::read_dir(&status).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".ready")) {
            assert!(
                start.elapsed() < ARCHIVE_TIMEOUT,
                "the archiver still has files to push after {ARCHIVE_TIMEOUT:?}\n--- server log:\n{}",
                tail(&self.log, 30)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `pg_control_system()`'s system identifier.
    pub fn system_id(&self) -> String {
        self.psql("select system_identifier from pg_control_system()")
    }

    /// A program of its PostgreSQL (`psql`, `pg_dump`...).
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Stops it now (immediate); drop does the same.
    pub fn stop(self) {}

    /// Stops it cleanly (`pg_ctl -m fast`: a shutdown checkpoint writes
    /// every page), keeping it to [`Cluster::start`] again.
    pub fn stop_clean(&self) {
        let r =
            run(as_postgres(self.tool("pg_ctl"), &self.cwd).arg("-D").arg(&self.addr.data).args(["-m", "fast", "-w", "stop"]), SQL_TIMEOUT);
        assert!(
            r.status.success(),
            "PostgreSQL at {} did not stop: {}\n--- server log:\n{}",
            self.addr.data.display(),
            r.stderr,
            tail(&self.log, 20)
        );
    }

    /// Starts it again after [`Cluster::stop_clean`], with its
    /// `postgresql.conf` (for clusters made by [`Cluster::new`]).
    pub fn start(&self) {
        self.pg_ctl_start(&[]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_immediate(&self.bin, &self.addr.data, &self.cwd);
    }
}

fn pgbench_run_args(seconds: u32, clients: u32) -> Vec<String> {
    let jobs = clients.min(2);
    ["-n", "-T", &seconds.to_string(), "-c", &clients.to_string(), "-j", &jobs.to_string(), "postgres"].map(String::from).to_vec()
}

/// A background program, killed on drop if still running.
pub struct Background {
    child: Option<Child>,
    what: String,
}

impl Background {
    /// A child started elsewhere, killed on drop like the others.
    pub fn from_child(child: Child, what: &str) -> Background {
        Background { child: Some(child), what: what.to_owned() }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for it to end: whether it succeeded, and its stderr (when
    /// piped).
    pub fn finish(mut self) -> (bool, String) {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Waits for it to end and requires success.
    pub fn wait_ok(mut self) {
        let child = self.child.take().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{} failed ({}): {}", self.what, out.status, String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fails with the first differing line (with context) unless the two dumps
/// are equal; never prints whole dumps.
pub fn assert_same_dump(what: &str, expected: &str, actual: &str) {
    if expected == actual {
        return;
    }
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let i = e.iter().zip(&a).position(|(x, y)| x != y).unwrap_or(e.len().min(a.len()));
    let around = |v: &[&str]| v[i.saturating_sub(3)..(i + 4).min(v.len())].join("\n");
    panic!(
        "{what}: the restored dump differs from the source's ({} vs {} lines), first at line {}:\n--- source:\n{}\n--- restored:\n{}",
        e.len(),
        a.len(),
        i + 1,
        around(&e),
        around(&a)
    );
}

// ---------------------------------------------------------------- object store servers

/// A test server's program: `$env` when set, else `default` (where
/// scripts/test-setup installs it).
fn server_program(env: &str, default: &str, what: &str) -> PathBuf {
    let program = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| default.into());
    assert!(program.exists(), "{what} not installed: run scripts/test-setup ({} missing)", program.display());
    program
}

/// Starts `cmd` with its output in `log`, in the log's directory.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    cmd.current_dir(log.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Waits until `port` on 127.0.0.1 takes connections; fails the test if
/// `child` exits first or `limit` passes, showing `log` when there is one.
fn wait_listening(child: &mut Child, port: u16, what: &str, limit: Duration, log: Option<&Path>) {
    let log = || log.map(|p| format!(":\n{}", tail(p, 20))).unwrap_or_default();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "{what} exited at start{}", log());
        assert!(start.elapsed() < limit, "{what} not listening after {limit:?}{}", log());
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- S3 (moto)

/// A moto S3 server on 127.0.0.1 with one bucket, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl Moto {
    pub fn start(bucket: &str) -> Moto {
        let program = server_program("PGKEEP_TEST_MOTO", "/opt/pgkeep-test/venv/bin/moto_server", "moto");
        let port = free_port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let mut moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_owned() };
        wait_listening(&mut moto.child, port, "moto_server", Duration::from_secs(30), None);
        run_ok(
            Command::new("curl").args([
                "-sS",
                "--fail",
                "--retry",
                "5",
                "--retry-connrefused",
                "-X",
                "PUT",
                &format!("{}/{bucket}", moto.endpoint),
            ]),
            Duration::from_secs(60),
        );
        moto
    }

    /// Stops answering (SIGSTOP): connections are accepted by the kernel,
    /// nothing replies, as with a hung server.
    pub fn freeze(&self) {
        run_ok(Command::new("kill").args(["-STOP", &self.child.id().to_string()]), Duration::from_secs(10));
    }

    /// Answers again (SIGCONT), with everything it stored.
    pub fn thaw(&self) {
        run_ok(Command::new("kill").args(["-CONT", &self.child.id().to_string()]), Duration::from_secs(10));
    }

    /// A repository in this bucket under `prefix`.
    pub fn repo(&self, prefix: &str) -> Repo {
        Repo::S3 { endpoint: self.endpoint.clone(), bucket: self.bucket.clone(), prefix: prefix.to_owned() }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- Azure (Azurite)

/// An Azurite blob server on 127.0.0.1, in memory, killed on drop.
pub struct Azurite {
    child: Child,
    /// Its working directory, holding its log.
    dir: tempfile::TempDir,
    /// Where the server listens: `http://127.0.0.1:PORT`.
    pub url: String,
    /// The account's blob service URL, as the `endpoint` of a repository.
    pub endpoint: String,
    /// A container created at start.
    pub container: String,
}

impl Azurite {
    /// The emulator's one account.
    pub const ACCOUNT: &'static str = "devstoreaccount1";
    /// Its well-known shared key (published by Microsoft; not a secret).
    pub const KEY: &'static str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    /// Starts Azurite on a free port and creates `container`.
    pub fn start(container: &str) -> Azurite {
        let program = server_program("PGKEEP_TEST_AZURITE", "/opt/pgkeep-test/azurite/node_modules/.bin/azurite-blob", "Azurite");
        let dir = tempfile::Builder::new().prefix("pgkeep-azurite-").tempdir_in("/tmp").unwrap();
        let log_path = dir.path().join("azurite.log");
        let port = free_port();
        let child = spawn_logged(
            Command::new(&program).args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()]).args([
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--loose",
                "--disableTelemetry",
                "--silent",
            ]),
            &log_path,
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut azurite = Azurite { child, dir, endpoint: format!("{url}/{}", Self::ACCOUNT), url, container: container.to_owned() };
        wait_listening(&mut azurite.child, port, "Azurite", Duration::from_secs(60), Some(&log_path));
        azurite.create_container(container);
        azurite
    }

    /// Creates a container: `object_store` cannot, so this signs the
    /// request itself (SharedKey, the emulator's account and key).
    pub fn create_container(&self, name: &str) {
        use base64::Engine as _;
        use hmac::{KeyInit as _, Mac as _};
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let version = "2021-08-06";
        // VERB, eleven standard headers left empty, the x-ms- headers, then
        // the resource: /account + the URL path, and the query.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{a}/{a}/{name}\nrestype:container",
            a = Self::ACCOUNT
        );
        let key = base64::engine::general_purpose::STANDARD.decode(Self::KEY).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(to_sign.as_bytes());
        let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let r = run(
            Command::new("curl")
                .args(["-sS", "--retry", "5", "--retry-connrefused", "-o", "/dev/stderr", "-w", "%{http_code}", "-X", "PUT"])
                .args(["-H", &format!("x-ms-date: {date}"), "-H", &format!("x-ms-version: {version}")])
                .args(["-H", &format!("Authorization: SharedKey {}:{signature}", Self::ACCOUNT), "-H", "Content-Length: 0"])
                .arg(format!("{}/{name}?restype=container", self.endpoint)),
            Duration::from_secs(60),
        );
        assert_eq!(r.stdout, "201", "creating container {name} on Azurite: HTTP {} {}", r.stdout, r.stderr);
    }

    /// The environment a pgkeep reaching this server needs: the emulator's
    /// account and key (the endpoint is in the config).
    pub fn credentials() -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_ACCOUNT_NAME".to_owned(), Self::ACCOUNT.to_owned()),
            ("AZURE_STORAGE_ACCOUNT_KEY".to_owned(), Self::KEY.to_owned()),
        ]
    }

    /// A repository in the container under `prefix`.
    pub fn repo(&self, prefix: &str) -> Repo {
        Repo::Azure { endpoint: self.endpoint.clone(), container: self.container.clone(), prefix: prefix.to_owned() }
    }

    /// Its log (for failure messages).
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("azurite.log")
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        // Azurite often ignores SIGTERM: ask, wait a moment, then SIGKILL.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- GCS (fake-gcs-server)

/// A fake-gcs-server on 127.0.0.1 (HTTP, in memory), killed on drop. It
/// serves reads and lists; it answers `object_store`'s writes with 400, so
/// its objects come from a seed directory given at start.
pub struct FakeGcs {
    child: Child,
    dir: tempfile::TempDir,
    /// Base URL, as the `endpoint` of a gs:// repository.
    pub endpoint: String,
}

impl FakeGcs {
    /// Starts the server serving `seed`: each directory in it is a bucket,
    /// each file under that an object named by its relative path.
    pub fn start(seed: &Path) -> FakeGcs {
        let program = server_program("PGKEEP_TEST_FAKE_GCS", "/opt/pgkeep-test/bin/fake-gcs-server", "fake-gcs-server");
        let dir = tempfile::Builder::new().prefix("pgkeep-fake-gcs-").tempdir_in("/tmp").unwrap();
        let log_path = dir.path().join("fake-gcs.log");
        let port = free_port();
        let child = spawn_logged(
            Command::new(&program)
                .args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port.to_string(), "-backend", "memory"])
                .args(["-log-level", "warn", "-public-host", &format!("127.0.0.1:{port}"), "-data"])
                .arg(seed),
            &log_path,
        );
        let mut gcs = FakeGcs { child, dir, endpoint: format!("http://127.0.0.1:{port}") };
        wait_listening(&mut gcs.child, port, "fake-gcs-server", Duration::from_secs(30), Some(&log_path));
        gcs
    }

    /// Its log (for failure messages).
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("fake-gcs.log")
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- fixtures

/// A cluster archiving to `repo` under stanza `stanza`, with its pgkeep
/// config written (stanza not created yet).
pub fn cluster_with_config(dir: &TestDir, stanza: &str, repo: &Repo) -> (Cluster, Pgkeep) {
    let pk = Pgkeep::new(dir, stanza, stanza).with_env(repo.env());
    let pg = Cluster::new(dir, &format!("{stanza}-data"), Some(&pk));
    pk.write_config(&pg.addr, repo);
    (pg, pk)
}

/// A throwaway cluster archiving to a local repository with stanza `demo`
/// created. Bind it as `let (dir, repo, pg, pk) = local_stanza(..)`: the
/// bindings drop in reverse, so the cluster stops before its dir goes.
pub fn local_stanza(name: &str) -> (TestDir, Repo, Cluster, Pgkeep) {
    let dir = TestDir::new(name);
    let repo = Repo::local(&dir, "repo");
    let (pg, pk) = cluster_with_config(&dir, "demo", &repo);
    pk.ok(&["stanza-create"]);
    (dir, repo, pg, pk)
}

/// The content of a backup's manifest in a local, unencrypted repository
/// (stanza `demo`), out of its `{"format","checksum","content"}` envelope,
/// with its file list (repository format 3: an object of its own, one
/// entry per line, zstd or uncompressed) as `files`, as format 2 had it.
pub fn read_manifest(repo: &Repo, label: &str) -> serde_json::Value {
    let path = repo.path().join("demo/backup").join(label).join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut content = envelope["content"].clone();
    if let Some(key) = content["file-list"]["key"].as_str() {
        let path = repo.path().join("demo").join(key);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = match key.ends_with(".zst") {
            true => zstd::decode_all(&bytes[..]).unwrap(),
            false => bytes,
        };
        let files: Vec<serde_json::Value> = String::from_utf8(text).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(Some(files.len() as u64), content["file-list"]["count"].as_u64(), "{}", path.display());
        content["files"] = serde_json::Value::Array(files);
    }
    content
}

/// Parses an LSN `X/Y` into a number.
pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap_or_else(|| panic!("not an LSN: {text:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Does `s` look like a backup label (`20261123-121500F`)?
pub fn is_full_label(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16 && b[8] == b'-' && b[15] == b'F' && b.iter().enumerate().all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit())
}

// ---------------------------------------------------------------- holes (issue 10)

impl Cluster {
    /// [`Cluster::new`] with `initdb_args` instead of the default `-k`
    /// (e.g. `&[]` for a cluster without data checksums). Authentication,
    /// user, encoding and locale are the same as [`Cluster::new`]'s.
    pub fn new_with_initdb(dir: &TestDir, name: &str, archive_to: Option<&Pgkeep>, initdb_args: &[&str]) -> Cluster {
        let c = Cluster::initdb(dir, name, archive_to, initdb_args, &pg_bin());
        c.pg_ctl_start(&[]);
        c
    }

    /// `initdb` at `dir/name` with the PostgreSQL of `bin`, configured as
    /// [`Cluster::new`] does, and not started (see [`Cluster::start`]).
    pub fn initdb(dir: &TestDir, name: &str, archive_to: Option<&Pgkeep>, initdb_args: &[&str], bin: &Path) -> Cluster {
        let data = dir.join(name);
        run_ok(
            as_postgres(bin.join("initdb"), dir.path())
                .args(initdb_args)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-D"])
                .arg(&data),
            SQL_TIMEOUT,
        );
        let port = free_port();
        let mut conf = format!(
            "\n# pgkeep tests\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nwal_level = replica\n",
            dir.path().display()
        );
        match archive_to {
            Some(pk) => {
                let _ = write!(conf, "archive_mode = on\narchive_command = '{}'\n", pk.archive_command());
            }
            None => conf.push_str("archive_mode = off\n"),
        }
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let c = Cluster {
            bin: bin.to_owned(),
            addr: PgAddr { data: data.clone(), socket_dir: dir.path().to_owned(), port },
            cwd: dir.path().to_owned(),
            log: dir.join(&format!("{name}.log")),
            env: archive_to.map(|pk| pk.env.clone()).unwrap_or_default(),
        };
        c
    }

    fn psql_in_cmd(&self, db: &str, sql: &str) -> Command {
        let mut c = as_postgres(self.tool("psql"), &self.cwd);
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-h"]).arg(&self.addr.socket_dir).args([
            "-p",
            &self.addr.port.to_string(),
            "-c",
            sql,
        ]);
        c
    }

    /// [`Cluster::psql`] in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let r = run(&mut self.psql_in_cmd(db, sql), SQL_TIMEOUT);
        assert!(r.status.success(), "psql -d {db} {sql:?} failed: {}\n--- server log:\n{}", r.stderr, tail(&self.log, 20));
        r.stdout.trim().to_owned()
    }

    /// Runs SQL in database `db` without requiring success.
    pub fn try_psql_in(&self, db: &str, sql: &str) -> Run {
        run(&mut self.psql_in_cmd(db, sql), SQL_TIMEOUT)
    }

    /// pg_dump of database `db` (without the `\restrict` lines), or the
    /// failed run: a damaged restore can make pg_dump fail.
    pub fn try_dump_db(&self, db: &str) -> Result<String, Run> {
        let r = run(
            as_postgres(self.tool("pg_dump"), &self.cwd).arg("-h").arg(&self.addr.socket_dir).args([
                "-p",
                &self.addr.port.to_string(),
                "-d",
                db,
            ]),
            Duration::from_secs(300),
        );
        if !r.status.success() {
            return Err(r);
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

    /// pg_dump of database `db`; fails the test if pg_dump fails.
    pub fn dump_db(&self, db: &str) -> String {
        self.try_dump_db(db)
            .unwrap_or_else(|r| panic!("pg_dump -d {db} of {} failed ({}): {}", self.addr.data.display(), r.status, r.stderr.trim()))
    }

    /// pg_amcheck of every database, returning what it reported instead
    /// of failing: (success, stdout + stderr).
    /// A standby cannot install amcheck: install it on its primary first.
    pub fn try_amcheck(&self) -> (bool, String) {
        let mut cmd = as_postgres(self.tool("pg_amcheck"), &self.cwd);
        cmd.arg("-h").arg(&self.addr.socket_dir).args(["-p", &self.addr.port.to_string(), "--all"]);
        if self.psql("select pg_is_in_recovery()") == "f" {
            cmd.arg("--install-missing");
        }
        let r = run(&mut cmd, Duration::from_secs(300));
        let out = format!("{}{}", r.stdout, r.stderr);
        (r.status.success() && r.stdout.trim().is_empty(), out)
    }

    /// Runs `pg_checksums` with `args` on this cluster's data directory
    /// (which must be stopped cleanly), as postgres.
    pub fn pg_checksums(&self, args: &[&str]) -> Run {
        run(as_postgres(self.tool("pg_checksums"), &self.cwd).args(args).arg("-D").arg(&self.addr.data), Duration::from_secs(300))
    }
}

impl Pgkeep {
    /// The same runner, with every pgkeep it starts (its own runs and,
    /// for a cluster created with it, `archive_command`) run under
    /// `umask` through a small wrapper script in the test dir.
    pub fn with_umask(&self, umask: &str) -> Pgkeep {
        let wrapper = self.cwd.join(format!("pgkeep-umask-{umask}"));
        std::fs::write(&wrapper, format!("#!/bin/sh\numask {umask}\nexec {} \"$@\"\n", self.bin.display())).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        Pgkeep { bin: wrapper, ..self.clone() }
    }

    /// The command line (program and arguments) of `pgkeep args` as this
    /// runner starts it, as the postgres user, for a test that starts it
    /// by other means (a shell, another parent).
    pub fn command_line(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> =
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"].iter().map(|s| s.to_string()).collect();
        v.push(self.bin.display().to_string());
        v.extend(["--config".to_string(), self.config.display().to_string(), "--stanza".to_string(), self.stanza.clone()]);
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// The working directory it runs in.
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }
}

/// The state letter of process `pid` (`R`, `S`, `Z`...) from
/// `/proc/PID/stat`, or `None` once it is gone (reaped).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Every file and directory under `dir` (recursively, `dir` itself
/// included as ""), with its mode bits and whether it is a directory.
/// Symbolic links are listed but not followed.
pub fn modes(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let meta = std::fs::symlink_metadata(&d).unwrap();
        out.push((d.strip_prefix(dir).unwrap().to_owned(), meta.mode() & 0o7777, true));
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                todo.push(p);
            } else if !meta.file_type().is_symlink() {
                out.push((p.strip_prefix(dir).unwrap().to_owned(), meta.mode() & 0o7777, false));
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------- standbys

impl Cluster {
    /// A streaming standby of `primary` at `dir/name`: `pg_basebackup -R`
    /// (fast checkpoint, WAL streamed), then started on a port of its own.
    /// It keeps the primary's archive settings, which a standby does not
    /// use until it is promoted. Returns once it streams.
    pub fn standby_of(dir: &TestDir, name: &str, primary: &Cluster) -> Cluster {
        let data = dir.join(name);
        run_ok(
            as_postgres(primary.tool("pg_basebackup"), dir.path()).arg("-D").arg(&data).arg("-h").arg(&primary.addr.socket_dir).args([
                "-p",
                &primary.addr.port.to_string(),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-c",
                "fast",
            ]),
            Duration::from_secs(300),
        );
        let port = free_port();
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, format!("\n# standby\nport = {port}\n").as_bytes()).unwrap();
        let c = Cluster {
            bin: primary.bin.clone(),
            addr: PgAddr { data, socket_dir: dir.path().to_owned(), port },
            cwd: dir.path().to_owned(),
            log: dir.join(&format!("{name}.log")),
            env: primary.env.clone(),
        };
        c.pg_ctl_start(&[]);
        c.wait_streaming();
        c
    }

    /// Starts a directory that `pgkeep restore --standby` wrote, with the
    /// settings of [`Cluster::start_recovery`]; it stays in recovery.
    /// With `archive`, it keeps the source's `archive_command`, so that once
    /// promoted it archives into the same repository.
    pub fn start_standby(dir: &TestDir, data: &Path, archive: bool) -> Cluster {
        Cluster::start_restored_dir(dir, data, archive, &[])
    }

    /// The `primary_conninfo` that reaches this server.
    pub fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres application_name=pgkeep-test", self.addr.socket_dir.display(), self.addr.port)
    }

    /// Tuples that pg_visibility finds on all-visible pages not visible to
    /// all, or on all-frozen pages not frozen, in `postgres`.
    pub fn visibility_findings(&self) -> String {
        self.psql("create extension if not exists pg_visibility");
        self.psql(
            "select count(*) from pg_class c, lateral (select t_ctid from pg_check_visible(c.oid) \
             union all select t_ctid from pg_check_frozen(c.oid)) x where c.relkind in ('r', 'm', 't') and c.relpersistence = 'p'",
        )
    }

    /// Waits until its WAL receiver streams (`pg_stat_wal_receiver`).
    pub fn wait_streaming(&self) {
        self.wait_for("streaming", "select coalesce((select status from pg_stat_wal_receiver), 'none')", |s| s == "streaming");
    }

    /// Waits until it has replayed up to `lsn` (a standby).
    pub fn wait_replayed(&self, lsn: &str) {
        let sql = format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        self.wait_for(&format!("replay to {lsn}"), &sql, |s| s == "t");
    }

    /// `pg_ctl promote`, then waits until it is out of recovery.
    pub fn promote(&self) {
        run_ok(as_postgres(self.tool("pg_ctl"), &self.cwd).arg("-D").arg(&self.addr.data).args(["-w", "promote"]), SQL_TIMEOUT);
        self.wait_promoted();
    }
}
