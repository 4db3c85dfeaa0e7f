//! Restore drills (`verify --restore`): the proof that a backup restores.
//! The backup is restored into a scratch directory to its consistent end,
//! PostgreSQL is started on it (on a private socket, no TCP, archiving
//! off so that nothing it does reaches the repository), recovery is
//! awaited until it promotes, `pg_amcheck` checks every heap and index of
//! every database, and the server is stopped and the scratch removed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::repo::Manifest;
use crate::restore::{RestoreOptions, Target, TargetAction};
use crate::types::BackupLabel;
use crate::Stanza;

/// Options of a drill.
#[derive(Debug, Clone, Default)]
pub struct DrillOptions {
    /// Repository (1-based; 0 means 1).
    pub repo: usize,
    /// The backup; default the newest.
    pub set: Option<BackupLabel>,
    /// Where to restore; default a new directory under the system's
    /// temporary directory. Removed afterwards.
    pub scratch: Option<PathBuf>,
    /// The `restore_command` the restored server uses.
    pub restore_command: String,
    /// How long recovery may take.
    pub timeout: Duration,
}

/// What a drill found.
#[derive(Debug, Clone)]
pub struct DrillReport {
    /// Backup restored.
    pub label: BackupLabel,
    /// Repository.
    pub repo: usize,
    /// Seconds to restore the files.
    pub restore_secs: f64,
    /// Seconds from starting PostgreSQL to its promotion.
    pub recovery_secs: f64,
    /// Databases `pg_amcheck` checked.
    pub databases: usize,
    /// What `pg_amcheck` reported (empty when all is well).
    pub amcheck: String,
}

impl DrillReport {
    /// Whether the backup restored, recovered and checked clean.
    pub fn ok(&self) -> bool {
        self.amcheck.trim().is_empty()
    }
}

/// Runs a drill. An `Err` means the drill could not be run or the backup
/// did not restore or recover; a report with `amcheck` output means it
/// recovered with damage.
pub async fn run(stanza: &Stanza, opts: &DrillOptions) -> Result<DrillReport> {
    if running_as_root() {
        return Err(Error::Input(
            "a restore drill starts PostgreSQL, which refuses to run as root: run pgkeep as the postgres user".into(),
        ));
    }
    let number = opts.repo.max(1);
    let repo = stanza.open(number).await?;
    let backups = repo.backups().await?;
    let m: &Manifest = match &opts.set {
        Some(l) => backups.iter().find(|m| &m.label == l).ok_or_else(|| {
            Error::NotFound(format!("backup {l} does not exist in repo {number}")).with_hint(crate::Hint::run(crate::Operation::Info))
        })?,
        None => backups.last().ok_or_else(|| Error::NotFound(format!("repo {number} has no backup to restore yet")))?,
    };
    let bin = pg_bin(m.pg_version / 10000)?;
    let scratch = match &opts.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir().join(format!("pgkeep-drill-{}-{}", m.label, std::process::id())),
    };
    if scratch.exists() && std::fs::read_dir(&scratch).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::Input(format!("scratch directory {} is not empty; give an empty or new one", scratch.display())));
    }
    std::fs::create_dir_all(&scratch).map_err(Error::io(format!("cannot create {}", scratch.display())))?;
    let result = drill(stanza, opts, m, &bin, &scratch, number).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn drill(stanza: &Stanza, opts: &DrillOptions, m: &Manifest, bin: &Path, scratch: &Path, number: usize) -> Result<DrillReport> {
    let data = scratch.join("data");
    let restore = RestoreOptions {
        pg_data: Some(data.clone()),
        set: Some(m.label.clone()),
        target: Some(Target::Immediate),
        action: TargetAction::Promote,
        tablespace_map: m.tablespaces.iter().map(|t| (t.oid.to_string(), scratch.join(format!("tablespace-{}", t.oid)))).collect(),
        restore_command: opts.restore_command.clone(),
        ..Default::default()
    };
    let mut stanza = stanza.clone();
    // Restore from the repository under test only.
    stanza.settings.repos = vec![stanza.settings.repos[number - 1].clone()];
    let started = Instant::now();
    crate::restore::run(&stanza, &restore).await?;
    let restore_secs = started.elapsed().as_secs_f64();
    // Packaged clusters keep their configuration outside the data
    // directory: give the copy what it needs to start.
    for (file, text) in [("postgresql.conf", ""), ("pg_hba.conf", "local all all peer\n"), ("pg_ident.conf", "")] {
        let path = data.join(file);
        if !path.exists() {
            std::fs::write(&path, text).map_err(Error::io(format!("cannot write {}", path.display())))?;
        }
    }
    let port = free_port()?;
    let server = Server { bin: bin.to_owned(), data: data.clone(), log: scratch.join("postgres.log") };
    let started = Instant::now();
    let result = async {
        server.start(scratch, port, opts.timeout).await?;
        wait_promoted(scratch, port, &server, opts.timeout).await?;
        let recovery_secs = started.elapsed().as_secs_f64();
        let (databases, amcheck) = amcheck(bin, scratch, port).await?;
        Ok(DrillReport { label: m.label.clone(), repo: number, restore_secs, recovery_secs, databases, amcheck })
    }
    .await;
    server.stop().await;
    result
}

/// A PostgreSQL server on the restored copy.
struct Server {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts the server and waits until it accepts connections (in hot
    /// standby, or promoted), at most `timeout`.
    async fn start(&self, socket_dir: &Path, port: u16, timeout: Duration) -> Result<()> {
        let options = format!(
            "-c port={port} -c listen_addresses='' -c unix_socket_directories='{}' -c archive_mode=off -c ssl=off -c hot_standby=on",
            socket_dir.display()
        );
        let out = tokio::process::Command::new(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &options, "-w", "-t", &timeout.as_secs().to_string(), "start"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(Error::io(format!("cannot run {}", self.bin.join("pg_ctl").display())))?;
        if !out.status.success() {
            return Err(Error::Refused(format!(
                "PostgreSQL did not start on the restored copy: {} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail()
            )));
        }
        Ok(())
    }

    /// Whether the server still runs (its pid file is there).
    fn running(&self) -> bool {
        self.data.join("postmaster.pid").exists()
    }

    /// The last lines of the server's log, for errors.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    async fn stop(&self) {
        if self.running() {
            let _ = tokio::process::Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
    }
}

/// Waits until the server has recovered and promoted.
async fn wait_promoted(socket_dir: &Path, port: u16, server: &Server, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(client) = connect(socket_dir, port).await {
            if let Ok(row) = client.query_one("select pg_is_in_recovery()", &[]).await {
                if !row.get::<_, bool>(0) {
                    return Ok(());
                }
            }
        }
        if !server.running() {
            return Err(Error::Refused(format!("PostgreSQL stopped while recovering the restored copy: {}", server.log_tail())));
        }
        if Instant::now() > deadline {
            return Err(Error::Refused(format!(
                "the restored copy did not finish recovery within {}s: {}",
                timeout.as_secs(),
                server.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn connect(socket_dir: &Path, port: u16) -> std::result::Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(socket_dir).port(port).user("postgres").dbname("postgres").connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Runs `pg_amcheck` on every database; returns (databases, its findings).
async fn amcheck(bin: &Path, socket_dir: &Path, port: u16) -> Result<(usize, String)> {
    let client = connect(socket_dir, port).await.map_err(Error::postgres("cannot connect to the restored copy"))?;
    let databases: i64 = client
        .query_one("select count(*) from pg_database where datallowconn", &[])
        .await
        .map_err(Error::postgres("cannot list the restored copy's databases"))?
        .get(0);
    let out = tokio::process::Command::new(bin.join("pg_amcheck"))
        .arg("-h")
        .arg(socket_dir)
        .args(["-p", &port.to_string(), "-U", "postgres", "--install-missing", "--all"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(Error::io(format!("cannot run {}", bin.join("pg_amcheck").display())))?;
    let mut findings = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        findings.push_str(&String::from_utf8_lossy(&out.stderr));
        if findings.trim().is_empty() {
            findings = format!("pg_amcheck exited with {}", out.status);
        }
    }
    Ok((databases as usize, findings))
}

/// The server binaries for a major version: Debian's layout, RHEL's, else
/// the first directory on the PATH whose `pg_ctl` is of that major (a
/// backup is only ever started by its own major's server).
fn pg_bin(major: u32) -> Result<PathBuf> {
    let known = [PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")), PathBuf::from(format!("/usr/pgsql-{major}/bin"))];
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    known
        .into_iter()
        .chain(on_path)
        .find(|d| d.join("pg_amcheck").exists() && major_of(&d.join("pg_ctl")) == Some(major))
        .ok_or_else(|| {
            Error::Input(format!(
                "PostgreSQL {major} server programs (pg_ctl, pg_amcheck) are not installed here (looked in /usr/lib/postgresql/{major}/bin, /usr/pgsql-{major}/bin and the PATH); install them to run a restore drill"
            ))
        })
}

/// The major version of a PostgreSQL program, from its `--version`
/// (`pg_ctl (PostgreSQL) 18.6`); `None` when it does not run.
fn major_of(program: &Path) -> Option<u32> {
    let out = std::process::Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().last()?.split('.').next()?.parse().ok()
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("cannot find a free port"))?;
    Ok(l.local_addr().map_err(Error::io("cannot find a free port"))?.port())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
