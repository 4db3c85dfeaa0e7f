//! `info`: what each repository holds for a stanza, as a structure that
//! serialises to the contract's JSON (`info --output json`).

use serde::Serialize;

use crate::error::{OneLine, Result};
use crate::repo::{BackupType, Manifest, Repository};
use crate::types::{BackupLabel, Lsn};
use crate::Stanza;

/// One stanza, as `info --output json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StanzaInfo {
    /// Stanza name.
    pub stanza: String,
    /// The cluster's system identifier.
    pub system_id: String,
    /// PostgreSQL major version.
    pub pg_version: String,
    /// Range of archived WAL (of the current system).
    pub archive: ArchiveInfo,
    /// Every system the stanza has held, oldest first, the current one
    /// last (more than one after `stanza-upgrade`).
    pub history: Vec<SystemInfo>,
    /// Backups of every repository, oldest first.
    pub backups: Vec<BackupInfo>,
    /// Each repository on its own.
    pub repos: Vec<RepoInfo>,
}

/// One repository of the stanza.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepoInfo {
    /// Repository number.
    pub repo: usize,
    /// Its `location`.
    pub location: String,
    /// `ok`, or `error` when it could not be read.
    pub status: &'static str,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Range of WAL archived in it.
    pub archive: ArchiveInfo,
    /// Backups in it.
    pub backups: usize,
    /// Bytes its backups store.
    pub repo_size: u64,
    /// Backups without a manifest: the one running, or ones interrupted
    /// (the next backup resumes or removes them).
    pub unfinished: Vec<BackupLabel>,
    /// The backup or expire running on it now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
}

/// A process holding a repository's stanza lock.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Running {
    /// `backup` or `expire`.
    pub command: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// RFC 3339.
    pub since: String,
}

/// One system of the stanza's history.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SystemInfo {
    /// 1, 2...: the order in which the stanza took them.
    pub id: u32,
    /// Its system identifier.
    pub system_id: String,
    /// Its PostgreSQL major version.
    pub pg_version: String,
    /// When the stanza took it, RFC 3339.
    pub since: String,
    /// Whether backups and WAL are taken of it now.
    pub current: bool,
    /// Range of its archived WAL, over every repository.
    pub archive: ArchiveInfo,
}

/// Range of archived WAL segments.
#[derive(Debug, Serialize, Default)]
pub struct ArchiveInfo {
    /// Oldest segment.
    pub min: Option<String>,
    /// Newest segment.
    pub max: Option<String>,
}

/// One backup.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupInfo {
    /// Label.
    pub label: BackupLabel,
    /// full, diff or incr.
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The backup it depends on.
    pub prior: Option<BackupLabel>,
    /// RFC 3339.
    pub start_time: String,
    /// RFC 3339.
    pub stop_time: String,
    /// Start LSN.
    pub start_lsn: Lsn,
    /// Stop LSN.
    pub stop_lsn: Lsn,
    /// First WAL segment needed.
    pub start_wal: String,
    /// Last WAL segment needed.
    pub stop_wal: String,
    /// Bytes of database.
    pub size: u64,
    /// Bytes stored.
    pub repo_size: u64,
    /// Repository number.
    pub repo: usize,
    /// The system the backup is of (see `history`).
    pub system_id: String,
    /// Its PostgreSQL major version.
    pub pg_version: String,
    /// Whether the backup verified page checksums (false when the cluster
    /// has data checksums off, and for backups taken before pgkeep did).
    pub page_checksums: bool,
    /// The server the backup read: `primary` or `standby`.
    pub from: crate::repo::ServerRole,
    /// Pages that failed their page checksum when the backup read them
    /// (the backup is kept; its manifest lists them per file).
    pub checksum_errors: u64,
    /// The files holding those pages, with how many failed in each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checksum_error_files: Vec<ChecksumErrorFile>,
}

pub use crate::repo::ChecksumErrorFile;

impl ArchiveInfo {
    /// Widens the range to hold segment `name`.
    fn include(&mut self, name: &str) {
        if self.min.as_deref().is_none_or(|m| name < m) {
            self.min = Some(name.to_owned());
        }
        if self.max.as_deref().is_none_or(|m| name > m) {
            self.max = Some(name.to_owned());
        }
    }
}

impl BackupInfo {
    fn of(m: &Manifest, repo: usize) -> Self {
        let ts = |t: &chrono::DateTime<chrono::Utc>| crate::types::rfc3339(*t);
        BackupInfo {
            label: m.label.clone(),
            kind: m.kind,
            prior: m.prior.clone(),
            start_time: ts(&m.start_time),
            stop_time: ts(&m.stop_time),
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            start_wal: m.start_wal.clone(),
            stop_wal: m.stop_wal.clone(),
            size: m.size,
            repo_size: m.repo_size,
            repo,
            system_id: m.system_id.to_string(),
            pg_version: (m.pg_version / 10000).to_string(),
            page_checksums: m.page_checksums,
            from: m.from,
            checksum_errors: m.checksum_error_pages(),
            checksum_error_files: m.checksum_error_files(),
        }
    }
}

/// Collects the info of a stanza across its repositories. A repository
/// that cannot be read is reported as such; only when none can is it an
/// error.
pub async fn collect(stanza: &Stanza) -> Result<StanzaInfo> {
    let mut archive = ArchiveInfo::default();
    let mut backups = Vec::new();
    let mut repos = Vec::new();
    let mut meta = None;
    let mut first_error = None;
    let mut history: Vec<SystemInfo> = Vec::new();
    for number in 1..=stanza.settings.repos.len() {
        let location = stanza.settings.repos[number - 1].location.clone().unwrap_or_default();
        match read_repo(stanza, number, location.clone()).await {
            Ok((r, info, mut found, systems)) => {
                for end in [&info.archive.min, &info.archive.max].into_iter().flatten() {
                    archive.include(end);
                }
                for s in systems {
                    match history.iter_mut().find(|h| h.system_id == s.system_id) {
                        Some(h) => {
                            for end in [&s.archive.min, &s.archive.max].into_iter().flatten() {
                                h.archive.include(end);
                            }
                        }
                        None => history.push(s),
                    }
                }
                backups.append(&mut found);
                meta.get_or_insert(r.meta);
                repos.push(info);
            }
            Err(e) => {
                let error = Some(OneLine(&e).to_string());
                first_error.get_or_insert(e);
                repos.push(RepoInfo {
                    repo: number,
                    location,
                    status: "error",
                    error,
                    archive: ArchiveInfo::default(),
                    backups: 0,
                    repo_size: 0,
                    unfinished: Vec::new(),
                    running: None,
                });
            }
        }
    }
    let Some(meta) = meta else { return Err(first_error.expect("at least one repository")) };
    backups.sort_by(|a, b| (&a.start_time, &a.label).cmp(&(&b.start_time, &b.label)));
    Ok(StanzaInfo {
        stanza: stanza.name().to_owned(),
        system_id: meta.system_id.to_string(),
        pg_version: meta.pg_major().to_string(),
        archive,
        history,
        backups,
        repos,
    })
}

async fn read_repo(stanza: &Stanza, number: usize, location: String) -> Result<(Repository, RepoInfo, Vec<BackupInfo>, Vec<SystemInfo>)> {
    let r = stanza.open(number).await?;
    let current = r.meta.current();
    let mut systems = Vec::new();
    let mut archive = ArchiveInfo::default();
    for system in r.meta.systems() {
        let mut range = ArchiveInfo::default();
        for (_, w) in r.for_system(system.system_id, "the stanza's history")?.list_segments().await? {
            range.include(&w.name);
        }
        if system.id == current.id {
            archive = ArchiveInfo { min: range.min.clone(), max: range.max.clone() };
        }
        systems.push(SystemInfo {
            id: system.id,
            system_id: system.system_id.to_string(),
            pg_version: system.pg_major().to_string(),
            since: crate::types::rfc3339(system.since),
            current: system.id == current.id,
            archive: range,
        });
    }
    let manifests = r.backups().await?;
    let unfinished = crate::repo::partial::unfinished(&r, &manifests).await?.into_iter().map(|u| u.label).collect();
    let running = crate::repo::lock::holder(&r).await?.map(|h| Running {
        command: h.command,
        host: h.host,
        pid: h.pid,
        since: crate::types::rfc3339(h.since),
    });
    let found: Vec<BackupInfo> = manifests.iter().map(|m| BackupInfo::of(m, number)).collect();
    let info = RepoInfo {
        repo: number,
        location,
        status: "ok",
        error: None,
        archive,
        backups: found.len(),
        repo_size: found.iter().map(|b| b.repo_size).sum(),
        unfinished,
        running,
    };
    Ok((r, info, found, systems))
}
