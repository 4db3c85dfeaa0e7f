//! The backup manifest and the stanza metadata, and the checksummed JSON
//! envelope every metadata object is stored in.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codec::Compress;
use crate::error::{Error, Result};
use crate::types::{BackupLabel, Lsn, SystemId, TimelineId};

pub use super::filelist::FileList;

/// Version of the repository format this build writes and reads: 2 added
/// files stored in parts (`parts` in a manifest's file entry), 3 the file
/// list as an object of its own (see [`super::filelist`]).
pub const FORMAT: u32 = 3;

/// Files larger than this are stored in parts of this size, each an object
/// of its own, copied and restored in parallel.
pub const PART_SIZE: u64 = 64 << 20;

/// `<stanza>/stanza.json`: which cluster the stanza belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct StanzaMeta {
    /// Name of the stanza.
    pub stanza: String,
    /// The cluster's system identifier.
    pub system_id: SystemId,
    /// `server_version_num`, e.g. 150014.
    pub pg_version: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// When the stanza was created.
    pub created: DateTime<Utc>,
    /// Encryption of the stanza's objects, when it is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<crate::crypto::CipherMeta>,
    /// Every system the stanza has held, oldest first, the current one
    /// (that of the fields above) last; written by the first
    /// `stanza-upgrade`. Empty means one system, that of the fields above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<SystemRecord>,
}

/// One system a stanza has held: a cluster as `initdb` made it, replaced
/// by another after `pg_upgrade` (which makes a new system identifier).
/// Its WAL has an archive of its own ([`SystemRecord::archive`]); its
/// backups name it by `system-id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct SystemRecord {
    /// 1 for the system the stanza was created for, then 2, 3...
    pub id: u32,
    /// The cluster's system identifier.
    pub system_id: SystemId,
    /// `server_version_num` when it was recorded.
    pub pg_version: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// When the stanza took it (stanza-create or stanza-upgrade).
    pub since: DateTime<Utc>,
}

impl SystemRecord {
    /// Major version, e.g. 15.
    pub fn pg_major(&self) -> u32 {
        self.pg_version / 10000
    }

    /// The directory of its WAL archive, relative to the stanza.
    pub fn archive(&self) -> String {
        crate::repo::keys::archive(self.id)
    }
}

impl StanzaMeta {
    /// Major version, e.g. 15.
    pub fn pg_major(&self) -> u32 {
        self.pg_version / 10000
    }

    /// Every system the stanza has held, oldest first; never empty.
    pub fn systems(&self) -> Vec<SystemRecord> {
        match self.history.is_empty() {
            true => vec![SystemRecord {
                id: 1,
                system_id: self.system_id,
                pg_version: self.pg_version,
                wal_segment_size: self.wal_segment_size,
                since: self.created,
            }],
            false => self.history.clone(),
        }
    }

    /// The system the stanza takes backups and WAL of now.
    pub fn current(&self) -> SystemRecord {
        self.systems().pop().expect("never empty")
    }

    /// The record of system `id`, when the stanza has held it.
    pub fn system(&self, id: SystemId) -> Option<SystemRecord> {
        self.systems().into_iter().find(|s| s.system_id == id)
    }

    /// The metadata after `stanza-upgrade` to `next`: the history gains
    /// it, and the fields above become its.
    pub fn upgraded(&self, system_id: SystemId, pg_version: u32, wal_segment_size: u64, now: DateTime<Utc>) -> StanzaMeta {
        let mut history = self.systems();
        let id = history.last().map_or(1, |s| s.id + 1);
        history.push(SystemRecord { id, system_id, pg_version, wal_segment_size, since: now });
        StanzaMeta { system_id, pg_version, wal_segment_size, history, ..self.clone() }
    }

    /// Stanza `demo` of system `system_id`, PostgreSQL 15, 16 MiB
    /// segments, unencrypted: what unit tests create.
    #[cfg(test)]
    pub fn for_test(system_id: u64) -> StanzaMeta {
        StanzaMeta {
            stanza: "demo".into(),
            system_id: SystemId(system_id),
            pg_version: 150000,
            wal_segment_size: 16 << 20,
            created: Utc::now(),
            cipher: None,
            history: Vec::new(),
        }
    }
}

/// Kind of backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Everything.
    Full,
    /// Changes since the last full backup.
    Diff,
    /// Changes since the last backup of any type.
    Incr,
}

impl std::fmt::Display for BackupType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        })
    }
}

/// A tablespace as found at backup time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Tablespace {
    /// Its OID: the name of its link under `pg_tblspc`.
    pub oid: u32,
    /// Its name.
    pub name: String,
    /// Where it lived on the source.
    pub location: String,
}

/// A directory of the data directory (kept even when empty).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DirEntry {
    /// Path relative to the data directory.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
}

/// A file of the backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FileEntry {
    /// Path relative to the data directory (tablespace files under
    /// `pg_tblspc/<oid>/`).
    pub path: String,
    /// Bytes copied.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time at backup (seconds since the epoch).
    pub mtime: i64,
    /// Status-change time at backup (`st_ctime`, nanoseconds since the
    /// epoch): every write moves it, and no program can set it. With the
    /// size and mtime, it lets a later backup leave the file unread (see
    /// `docs/incremental.md`). Absent in manifests written before pgkeep
    /// recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime: Option<i64>,
    /// BLAKE3, hex, of what the stored object holds once decompressed: the
    /// file's content, or for a delta the page records. Empty for a file
    /// stored in `parts`.
    pub checksum: String,
    /// Key of the stored object, relative to the stanza; `None` when
    /// nothing changed since the prior backup (a delta of no pages).
    pub key: Option<String>,
    /// Bytes stored.
    pub repo_size: u64,
    /// The object holds only the pages changed since the prior backup
    /// (see [`crate::repo::pages`]); the rest of the file is the prior
    /// backup's copy of the same path, cut or extended to `size`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
    /// Pages stored by a delta.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: u64,
    /// Set when the object is bundled: it is `repo-size` bytes at this
    /// offset of the bundle named by `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// For a delta, BLAKE3 of the whole file as the backup read it (for a
    /// whole copy that is `checksum`): `restore --delta` keeps a file that
    /// already has this content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pages of this file (numbers in the file, ascending) that failed
    /// their PostgreSQL page checksum when the backup read them; at most
    /// [`crate::pg::checksum::MAX_LISTED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksum_errors: Vec<u32>,
    /// Failing pages beyond those listed in `checksum_errors`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checksum_errors_unlisted: u64,
    /// For a file over [`PART_SIZE`]: its parts, in file order, each
    /// stored as for a file of its own (then `key` is `None`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
    /// Which file on disk this was (see [`FileIdentity`]): a later backup
    /// skips pages of this path only while it is still the same file.
    /// Absent in manifests written before pgkeep recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileIdentity>,
}

/// Which file a path named when a backup read it: device, inode and, where
/// the file system keeps it, birth time (`statx`'s `btime`). A file that
/// is removed and created again under the same name (a database dropped
/// and created again with the same OID, a relation file number reused) is
/// another file even when its inode number is reused, because its birth
/// time differs; nothing on Linux can set a birth time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// Birth time in nanoseconds since the epoch, when known.
    pub birth: Option<i128>,
}

impl FileIdentity {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        let birth = meta.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos() as i128);
        FileIdentity { dev: meta.dev(), ino: meta.ino(), birth }
    }

    /// Whether two identities name the same file. With birth times on both
    /// sides, inode and birth time decide (the device number of a volume
    /// can change when it is mounted again, on another node say); without,
    /// device and inode, and an inode number can be reused (see
    /// `docs/incremental.md`).
    pub fn same_file(&self, other: &FileIdentity) -> bool {
        match (self.birth, other.birth) {
            (Some(a), Some(b)) => self.ino == other.ino && a == b,
            (None, None) => self.ino == other.ino && self.dev == other.dev,
            _ => false,
        }
    }
}

impl std::fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.birth {
            Some(b) => write!(f, "{}:{}:{b}", self.dev, self.ino),
            None => write!(f, "{}:{}:-", self.dev, self.ino),
        }
    }
}

impl std::str::FromStr for FileIdentity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Corrupt(format!("'{s}' is not a file identity (device:inode:birth)"));
        let mut it = s.split(':');
        let (dev, ino, birth) = (it.next().ok_or_else(bad)?, it.next().ok_or_else(bad)?, it.next().ok_or_else(bad)?);
        Ok(FileIdentity {
            dev: dev.parse().map_err(|_| bad())?,
            ino: ino.parse().map_err(|_| bad())?,
            birth: if birth == "-" { None } else { Some(birth.parse().map_err(|_| bad())?) },
        })
    }
}

impl Serialize for FileIdentity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileIdentity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One part of a file stored in parts: the bytes from `start`, up to
/// [`PART_SIZE`] of them, stored whole or as the pages changed (`delta` of
/// its file), in an object of its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Part {
    /// Offset in the file.
    pub start: u64,
    /// Bytes of the file read for this part.
    pub size: u64,
    /// Key of the stored object; `None` for a delta of no pages.
    pub key: Option<String>,
    /// Bytes stored.
    pub repo_size: u64,
    /// BLAKE3 of the object's content once decompressed.
    pub checksum: String,
    /// Pages stored by a delta.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: u64,
    /// For a delta, BLAKE3 of the part's bytes as read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A stored piece of a file, whatever the way it is stored: the whole file
/// (possibly in a bundle), or one of its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Offset in the file of the first byte it covers.
    pub start: u64,
    /// Bytes of the file it covers.
    pub size: u64,
    /// The object; `None` when a delta stored no pages.
    pub key: Option<String>,
    /// The byte range of `key` to read, for a bundled file.
    pub range: Option<std::ops::Range<u64>>,
    /// Bytes stored.
    pub repo_size: u64,
    /// BLAKE3 of what the object holds once decompressed.
    pub checksum: String,
    /// BLAKE3 of the file's bytes it covers, as read.
    pub content: String,
    /// It holds page records, not bytes.
    pub delta: bool,
}

impl FileEntry {
    /// A whole-copy entry with only path, size and mtime set, for unit
    /// tests of planning functions.
    #[cfg(test)]
    pub(crate) fn for_test(path: &str, size: u64, mtime: i64) -> Self {
        FileEntry {
            path: path.into(),
            size,
            mode: 0o600,
            mtime,
            ctime: None,
            checksum: String::new(),
            key: None,
            repo_size: 0,
            delta: false,
            pages: 0,
            offset: None,
            content: None,
            checksum_errors: vec![],
            checksum_errors_unlisted: 0,
            parts: vec![],
            id: None,
        }
    }

    /// How many pages of this file failed their page checksum.
    pub fn checksum_error_pages(&self) -> u64 {
        self.checksum_errors.len() as u64 + self.checksum_errors_unlisted
    }
}

impl FileEntry {
    /// The objects stored for this file alone (bundles are shared):
    /// (key, bytes stored).
    pub fn own_objects(&self) -> Vec<(&str, u64)> {
        match (&self.key, self.offset) {
            (Some(key), None) => vec![(key.as_str(), self.repo_size)],
            (_, Some(_)) => Vec::new(),
            (None, None) => self.parts.iter().filter_map(|p| Some((p.key.as_deref()?, p.repo_size))).collect(),
        }
    }

    /// The stored pieces of the file, in file order.
    pub fn pieces(&self) -> Vec<Piece> {
        if self.parts.is_empty() {
            return vec![Piece {
                start: 0,
                size: self.size,
                key: self.key.clone(),
                range: self.offset.map(|o| o..o + self.repo_size),
                repo_size: self.repo_size,
                checksum: self.checksum.clone(),
                content: self.content.clone().unwrap_or_else(|| self.checksum.clone()),
                delta: self.delta,
            }];
        }
        self.parts
            .iter()
            .map(|p| Piece {
                start: p.start,
                size: p.size,
                key: p.key.clone(),
                range: None,
                repo_size: p.repo_size,
                checksum: p.checksum.clone(),
                content: p.content.clone().unwrap_or_else(|| p.checksum.clone()),
                delta: self.delta,
            })
            .collect()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `<stanza>/backup/<label>/manifest.json`: a backup exists once this is
/// written, and only then.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// The backup's label.
    pub label: BackupLabel,
    /// full, diff or incr.
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The backup this one depends on.
    pub prior: Option<BackupLabel>,
    /// When `pg_backup_start` was called.
    pub start_time: DateTime<Utc>,
    /// When `pg_backup_stop` returned and the WAL was archived.
    pub stop_time: DateTime<Utc>,
    /// Redo point of the backup's checkpoint.
    pub start_lsn: Lsn,
    /// End of the backup: the cluster is consistent from here.
    pub stop_lsn: Lsn,
    /// Timeline at backup start.
    pub timeline: TimelineId,
    /// First WAL segment the backup needs.
    pub start_wal: String,
    /// Last WAL segment the backup needs.
    pub stop_wal: String,
    /// The cluster's system identifier.
    pub system_id: SystemId,
    /// `server_version_num`.
    pub pg_version: u32,
    /// Next transaction id when the backup started (`pg_current_snapshot` xmin).
    pub start_xid: u64,
    /// Next transaction id after the backup stopped (`pg_current_snapshot` xmax).
    pub stop_xid: u64,
    /// Compression of the stored files.
    pub compress: Compress,
    /// Bytes of database copied.
    pub size: u64,
    /// Bytes stored for this backup.
    pub repo_size: u64,
    /// The `backup_label` returned by `pg_backup_stop`.
    pub backup_label: String,
    /// The `tablespace_map` returned by `pg_backup_stop`, if any.
    pub tablespace_map: Option<String>,
    /// Tablespaces.
    pub tablespaces: Vec<Tablespace>,
    /// Directories, parents before children.
    pub dirs: Vec<DirEntry>,
    /// The files, in manifests of format 2 and before (`files`); from
    /// format 3 they are in [`Manifest::file_list`]. Read either with
    /// [`Repository::file_reader`](super::Repository::file_reader).
    #[serde(rename = "files", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) inline_files: Vec<FileEntry>,
    /// The file list (format 3): its own object, streamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_list: Option<FileList>,
    /// Format 3: the files with pages that failed their page checksum
    /// (before, found in `files`); see [`Manifest::checksum_error_files`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) checksum_error_files: Vec<ChecksumErrorFile>,
    /// Whether the backup verified page checksums (the cluster has data
    /// checksums on); false in manifests written before pgkeep did.
    #[serde(default)]
    pub page_checksums: bool,
    /// Which server's files the backup read: the primary, or a standby
    /// (`backup-standby`); absent (primary) in manifests written before
    /// pgkeep could back up a standby.
    #[serde(default)]
    pub from: ServerRole,
    /// The data directory the backup read (its [`FileIdentity`]): a later
    /// backup builds on this one only when it reads the same directory.
    /// Absent in manifests written before pgkeep recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_directory: Option<FileIdentity>,
}

/// The role of the server a backup was taken from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerRole {
    /// The primary.
    #[default]
    Primary,
    /// A streaming standby.
    Standby,
}

impl std::fmt::Display for ServerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerRole::Primary => "primary",
            ServerRole::Standby => "standby",
        })
    }
}

/// A file of a backup with pages that failed their page checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumErrorFile {
    /// Path relative to the data directory.
    pub path: String,
    /// How many pages failed.
    pub pages: u64,
}

impl ChecksumErrorFile {
    /// The files of `files` with pages that failed.
    pub fn of<'a>(files: impl IntoIterator<Item = &'a FileEntry>) -> Vec<ChecksumErrorFile> {
        files
            .into_iter()
            .filter(|f| f.checksum_error_pages() > 0)
            .map(|f| ChecksumErrorFile { path: f.path.clone(), pages: f.checksum_error_pages() })
            .collect()
    }
}

impl Manifest {
    /// The files with pages that failed their page checksum when the
    /// backup read them.
    pub fn checksum_error_files(&self) -> Vec<ChecksumErrorFile> {
        match self.file_list {
            Some(_) => self.checksum_error_files.clone(),
            None => ChecksumErrorFile::of(&self.inline_files),
        }
    }

    /// Pages that failed their page checksum, over all files.
    pub fn checksum_error_pages(&self) -> u64 {
        self.checksum_error_files().iter().map(|f| f.pages).sum()
    }

    /// How many files the backup holds.
    pub fn file_count(&self) -> u64 {
        match &self.file_list {
            Some(l) => l.count,
            None => self.inline_files.len() as u64,
        }
    }
}

impl Manifest {
    /// A manifest with only the catalog fields set, for unit tests of
    /// planning functions.
    #[cfg(test)]
    pub(crate) fn for_test(label: &str, kind: BackupType, prior: Option<&str>, stop: DateTime<Utc>, lsn: u64, xids: (u64, u64)) -> Self {
        Manifest {
            label: BackupLabel(label.into()),
            kind,
            prior: prior.map(|p| BackupLabel(p.into())),
            start_time: stop - chrono::Duration::seconds(60),
            stop_time: stop,
            start_lsn: Lsn(lsn - 100),
            stop_lsn: Lsn(lsn),
            timeline: TimelineId(1),
            start_wal: String::new(),
            stop_wal: String::new(),
            system_id: SystemId(1),
            pg_version: 150000,
            start_xid: xids.0,
            stop_xid: xids.1,
            compress: Compress::Zstd,
            size: 0,
            repo_size: 0,
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            dirs: vec![],
            inline_files: vec![],
            file_list: None,
            checksum_error_files: vec![],
            page_checksums: false,
            from: ServerRole::Primary,
            data_directory: None,
        }
    }
}

#[derive(Serialize)]
struct SealedOut<'a> {
    format: u32,
    checksum: String,
    content: &'a RawValue,
}

#[derive(Deserialize)]
struct SealedIn {
    format: u32,
    checksum: String,
    content: Box<RawValue>,
}

/// The format of metadata objects whose content format 3 did not change
/// (everything but a manifest with a file list): written as 2, so that a
/// pgkeep that reads format 2 still reads them.
pub const METADATA_FORMAT: u32 = 2;

/// Serialises `value` in the checksummed envelope
/// `{"format":2,"checksum":"<blake3 of content>","content":{...}}`.
pub fn seal<T: Serialize>(value: &T) -> Bytes {
    seal_as(value, METADATA_FORMAT)
}

/// As [`seal`], with `format` in the envelope.
pub fn seal_as<T: Serialize>(value: &T, format: u32) -> Bytes {
    let content = serde_json::to_string_pretty(value).expect("metadata serialises");
    let raw = RawValue::from_string(content).expect("serde_json output is JSON");
    let checksum = blake3::hash(raw.get().as_bytes()).to_hex().to_string();
    let out = SealedOut { format, checksum, content: &raw };
    Bytes::from(serde_json::to_vec_pretty(&out).expect("envelope serialises"))
}

/// Reads an envelope written by [`seal`], checking format and checksum.
/// `what` names the object in errors.
pub fn unseal<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    let env: SealedIn = serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what} is damaged ({e}); it cannot be read")))?;
    if env.format > FORMAT {
        return Err(Error::Refused(format!(
            "{what} has repository format {} but this pgkeep reads format {FORMAT} at most; upgrade pgkeep",
            env.format
        )));
    }
    if blake3::hash(env.content.get().as_bytes()).to_hex().as_str() != env.checksum {
        return Err(Error::Corrupt(format!("{what} fails its checksum: the stored object is corrupt")));
    }
    serde_json::from_str(env.content.get()).map_err(|e| Error::Corrupt(format!("{what} is damaged ({e}); it cannot be read")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_metadata_round_trips_and_detects_a_flipped_byte() {
        let meta = StanzaMeta {
            stanza: "demo".into(),
            system_id: SystemId(7_300_000_000_000_000_001),
            pg_version: 150014,
            wal_segment_size: 16 << 20,
            created: Utc::now(),
            cipher: None,
            history: Vec::new(),
        };
        let sealed = seal(&meta);
        assert_eq!(unseal::<StanzaMeta>(&sealed, "stanza.json").unwrap(), meta);
        let mut bad = sealed.to_vec();
        let at = bad.windows(4).position(|w| w == b"demo").unwrap();
        bad[at] = b'x';
        let e = unseal::<StanzaMeta>(&bad, "stanza.json").unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        let e = unseal::<StanzaMeta>(&sealed[..sealed.len() / 2], "stanza.json").unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
    }
}
