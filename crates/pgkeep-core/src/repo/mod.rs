//! The repository: one stanza's metadata, WAL archive and backups in a
//! [`Store`]. The layout and the crash-safety argument are written down in
//! `docs/repository-format.md`; in short:
//!
//! ```text
//! <location>/<stanza>/stanza.json                          which cluster
//! <location>/<stanza>/archive/<tli+log>/<segment>-<blake3><ext>
//! <location>/<stanza>/archive/history/<tli>.history-<blake3><ext>
//! <location>/<stanza>/archive-<n>/...     WAL of the n-th system (n > 1)
//! <location>/<stanza>/backup/<label>/pg_data/<path><ext>   file contents
//! <location>/<stanza>/backup/<label>/partial.json          while copying
//! <location>/<stanza>/backup/<label>/manifest.json         written last
//! ```
//!
//! Concurrency: any number of `archive-push`, `archive-get`, `info` and
//! `restore` may run together. Archived names carry the content's checksum,
//! so two pushes can never overwrite each other, whatever the store
//! guarantees about conditional writes. A backup refuses to start while
//! another one's checkpoint has a live holder ([`crate::backup::resume`]).

pub mod filelist;
pub mod keys;
pub mod lock;
pub mod manifest;
pub mod pages;
pub mod partial;

use bytes::Bytes;

use crate::codec::{self, Compress};
use crate::crypto::Cipher;
use crate::error::{Error, Hint, Operation, Opt, Result};
use crate::storage::{Listed, Store};
use crate::types::{BackupLabel, SystemId, TimelineHistory, TimelineId, WalFileName, WalSegment};
pub use manifest::{BackupType, ChecksumErrorFile, DirEntry, FileEntry, Manifest, ServerRole, StanzaMeta, SystemRecord, Tablespace};

/// A stanza in one repository.
#[derive(Clone, Debug)]
pub struct Repository {
    store: Store,
    /// The key, when the repository is encrypted.
    pub cipher: Option<Cipher>,
    /// 1-based number of the repository in the configuration.
    pub number: usize,
    /// The stanza's metadata.
    pub meta: StanzaMeta,
    /// The system whose WAL this handle archives and reads: the stanza's
    /// current one, unless chosen with [`Repository::for_system`].
    pub system: SystemRecord,
}

/// An archived WAL file as found in the archive.
#[derive(Debug, Clone)]
pub struct ArchivedWal {
    /// The WAL file name, e.g. `000000010000000000000003`.
    pub name: String,
    /// Key relative to the stanza.
    pub key: String,
    /// BLAKE3 of the original content, hex.
    pub checksum: String,
    /// How it is compressed.
    pub compress: Compress,
    /// Stored bytes.
    pub size: u64,
    /// When it was stored.
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// Result of [`Repository::push_wal`].
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now.
    Stored,
    /// The same content was already archived.
    AlreadyArchived,
}

const STANZA_FILE: &str = keys::STANZA;

impl Repository {
    /// Opens `stanza` in `store`; a clear error when it was never created,
    /// or when the passphrase does not fit its encryption.
    pub async fn open(store: &Store, stanza: &str, number: usize, passphrase: Option<&[u8]>) -> Result<Repository> {
        let store = store.sub(stanza);
        let what = format!("{STANZA_FILE} of stanza '{stanza}' in repo {number} ({})", store.location());
        match store.get(STANZA_FILE).await? {
            Some(bytes) => {
                let meta: StanzaMeta = manifest::unseal(&bytes, &what)?;
                let cipher = open_cipher(&meta, passphrase, number)?;
                Ok(Repository { system: meta.current(), meta, store, number, cipher })
            }
            None => Err(Error::Input(format!("stanza '{stanza}' does not exist in repo {number} ({})", store.location()))
                .with_hint(Hint::run(Operation::StanzaCreate))),
        }
    }

    /// Creates the stanza, or accepts an existing one of the same cluster.
    /// Returns whether it was created now.
    pub async fn create(store: &Store, mut meta: StanzaMeta, number: usize, passphrase: Option<&[u8]>) -> Result<(Repository, bool)> {
        let sub = store.sub(&meta.stanza);
        if let Some(bytes) = sub.get(STANZA_FILE).await? {
            let what = format!("{STANZA_FILE} in repo {number}");
            let existing: StanzaMeta = manifest::unseal(&bytes, &what)?;
            existing.same_cluster(&meta, number, sub.location())?;
            let cipher = open_cipher(&existing, passphrase, number)?;
            return Ok((Repository { store: sub, number, system: existing.current(), meta: existing, cipher }, false));
        }
        if let Some(pass) = passphrase {
            meta.cipher = Some(Cipher::create(pass)?.1);
        }
        // Refuse a location holding WAL or backups without metadata: they
        // belong to something we cannot vouch for.
        if !sub.list("").await?.is_empty() {
            return Err(Error::Refused(format!(
                "repo {number} ({}) already holds files for stanza '{}' but no {STANZA_FILE}; use an empty location",
                sub.location(),
                meta.stanza
            )));
        }
        sub.put(STANZA_FILE, manifest::seal(&meta), true).await?;
        // Read back what won, in case another stanza-create raced us.
        let repo = Repository::open(store, &meta.stanza, number, passphrase).await?;
        repo.meta.same_cluster(&meta, number, sub.location())?;
        Ok((repo, true))
    }

    /// The store under the stanza.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This handle for system `id` of the stanza's history: its WAL
    /// operations use that system's archive. Refused when the stanza never
    /// held it.
    pub fn for_system(&self, id: SystemId, of_what: &str) -> Result<Repository> {
        match self.meta.system(id) {
            Some(system) => Ok(Repository { system, ..self.clone() }),
            None => Err(self.not_ours(id, of_what)),
        }
    }

    /// Refuses data of any system but the one this handle is for (the
    /// stanza's current one unless chosen otherwise): another cluster, an
    /// older system of the stanza, or a newer one `stanza-upgrade` has not
    /// recorded yet.
    pub fn check_system_id(&self, id: SystemId, of_what: &str) -> Result<()> {
        if id == self.system.system_id {
            return Ok(());
        }
        match self.meta.system(id) {
            Some(old) => Err(Error::Refused(format!(
                "{of_what} belongs to system {id} (PostgreSQL {}), which stanza '{}' in repo {} held before system {} (PostgreSQL {}) replaced it; it takes no more backups or WAL of it: point the old cluster at another stanza, or stop it",
                old.pg_major(),
                self.meta.stanza,
                self.number,
                self.system.system_id,
                self.system.pg_major()
            ))),
            None => Err(self.not_ours(id, of_what)),
        }
    }

    fn not_ours(&self, id: SystemId, of_what: &str) -> Error {
        Error::Refused(format!(
            "{of_what} belongs to the cluster with system identifier {id}, but stanza '{}' in repo {} holds cluster {}: after pg_upgrade, the stanza must record the new system first; else this is the wrong stanza or repository",
            self.meta.stanza, self.number, self.system.system_id
        ))
        .with_hint(Hint::any_of([Hint::run(Operation::StanzaUpgrade), Hint::retry(Opt::Stanza)]))
    }

    // ----- WAL archive -----

    /// Archives one WAL file whose content is `data`. An identical file
    /// already archived is success; a different one is refused and nothing
    /// is overwritten (the key carries the checksum, so it cannot be).
    pub async fn push_wal(&self, name: &WalFileName, data: &[u8], compress: Compress, level: Option<i32>) -> Result<Pushed> {
        let packed = codec::compress_bytes(compress, level, data).map_err(Error::io("cannot compress WAL"))?;
        self.push_packed_wal(name, data, compress, &packed).await
    }

    /// [`Repository::push_wal`] with the content already compressed
    /// (`packed`, by `compress`), so that several repositories share one
    /// compression.
    pub async fn push_packed_wal(&self, name: &WalFileName, data: &[u8], compress: Compress, packed: &[u8]) -> Result<Pushed> {
        let checksum = self.content_hash(data);
        let found = self.find_wal(name).await?;
        if found.iter().any(|f| f.checksum == checksum) {
            return Ok(Pushed::AlreadyArchived);
        }
        if !found.is_empty() {
            return Err(Error::Refused(format!(
                "WAL file {} is already archived in repo {} with different content; refusing to overwrite it. Another cluster may be archiving to stanza '{}': check archive_command",
                name.as_str(),
                self.number,
                self.meta.stanza
            )));
        }
        let packed = match &self.cipher {
            Some(c) => c.seal(packed)?,
            None => packed.to_vec(),
        };
        let key = keys::wal(&self.system.archive(), name, &checksum, compress.extension());
        self.store.put(&key, Bytes::from(packed), true).await?;
        Ok(Pushed::Stored)
    }

    /// Every archived copy of `name` (normally zero or one).
    pub async fn find_wal(&self, name: &WalFileName) -> Result<Vec<ArchivedWal>> {
        let dir = keys::wal_dir(&self.system.archive(), name);
        let mut out = Vec::new();
        for l in self.store.list(&dir).await? {
            if let Some(w) = parse_archived(&dir, l) {
                if w.name == name.as_str() {
                    out.push(w);
                }
            }
        }
        Ok(out)
    }

    /// Reads and verifies an archived WAL file; `NotFound` when absent.
    pub async fn get_wal(&self, name: &WalFileName) -> Result<Vec<u8>> {
        let found = self.find_wal(name).await?;
        let w = match found.as_slice() {
            [] => return Err(Error::NotFound(format!("WAL file {} is not in repo {}", name.as_str(), self.number))),
            [one] => one,
            _ => {
                return Err(Error::Corrupt(format!(
                    "repo {} holds {} different copies of WAL file {}; remove the wrong one",
                    self.number,
                    found.len(),
                    name.as_str()
                ))
                .with_hint(Hint::run(Operation::Verify)))
            }
        };
        self.read_wal(w).await
    }

    /// Reads one archived WAL object and checks it against the hash in
    /// its name.
    pub async fn read_wal(&self, w: &ArchivedWal) -> Result<Vec<u8>> {
        let what = format!("archived WAL object '{}' in repo {}", w.key, self.number);
        let stored = self.store.get(&w.key).await?.ok_or_else(|| Error::Corrupt(format!("{what} vanished while being read")))?;
        let stored = self.unseal_bytes(stored, &what)?;
        let limit = (self.system.wal_segment_size).max(64 << 20);
        let data = codec::decompress_bytes(w.compress, &stored, limit)
            .map_err(|e| Error::Corrupt(format!("{what} cannot be decompressed ({e}): it is corrupt or truncated")))?;
        if self.content_hash(&data) != w.checksum {
            return Err(Error::Corrupt(format!("{what} fails its checksum: it is corrupt or truncated")));
        }
        Ok(data)
    }

    /// The history of `timeline` from its archived history file; `None`
    /// when the archive does not have it. Timeline 1 has no ancestors.
    pub async fn timeline_history(&self, timeline: TimelineId) -> Result<Option<TimelineHistory>> {
        if timeline.0 == 1 {
            return Ok(Some(TimelineHistory::root(timeline)));
        }
        let name = WalFileName::History(format!("{:08X}.history", timeline.0));
        let data = match self.get_wal(&name).await {
            Ok(data) => data,
            Err(e) if matches!(e.kind(), Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&data);
        TimelineHistory::parse(timeline, &text)
            .map(Some)
            .ok_or_else(|| Error::Corrupt(format!("archived {} in repo {} is not a timeline history file", name.as_str(), self.number)))
    }

    /// Every archived WAL file of this handle's system, sorted by name.
    pub async fn list_wal(&self) -> Result<Vec<ArchivedWal>> {
        let dir = self.system.archive();
        let mut out: Vec<_> = self.store.list(&dir).await?.into_iter().filter_map(|l| parse_archived(&dir, l)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Archived segments (not history, partial or backup files), sorted.
    pub async fn list_segments(&self) -> Result<Vec<(WalSegment, ArchivedWal)>> {
        Ok(self.segments_of(self.list_wal().await?))
    }

    /// The segments among `listed` (from [`Repository::list_wal`]).
    pub fn segments_of(&self, listed: Vec<ArchivedWal>) -> Vec<(WalSegment, ArchivedWal)> {
        let seg = self.system.wal_segment_size;
        listed.into_iter().filter_map(|w| WalSegment::parse(&w.name, seg).map(|s| (s, w))).collect()
    }

    /// The first segment from `first` to `last` (same timeline) that
    /// `segments` (from [`Repository::list_segments`]) lacks.
    pub fn first_missing(segments: &[(WalSegment, ArchivedWal)], first: WalSegment, last: WalSegment) -> Option<WalSegment> {
        let have: std::collections::HashSet<WalSegment> = segments.iter().map(|(s, _)| *s).collect();
        (first.number..=last.number).map(|number| WalSegment { timeline: first.timeline, number }).find(|s| !have.contains(s))
    }

    // ----- backups -----

    /// Key prefix of a backup's objects.
    pub fn backup_dir(label: &BackupLabel) -> String {
        keys::backup(label)
    }

    fn manifest_key(label: &BackupLabel) -> String {
        keys::manifest(label)
    }

    /// Writes the manifest: the backup exists from this moment.
    pub async fn write_manifest(&self, m: &Manifest) -> Result<()> {
        // A manifest with its file list apart is format 3: older readers
        // must refuse it rather than read a backup of no files.
        let format = if m.file_list.is_some() { manifest::FORMAT } else { manifest::METADATA_FORMAT };
        if !self.put_metadata_as(&Self::manifest_key(&m.label), m, true, format).await? {
            return Err(Error::Refused(format!("backup {} already exists in repo {}", m.label, self.number)));
        }
        Ok(())
    }

    /// A backup's manifest; `None` when it was never written (a backup
    /// that is not complete).
    pub async fn manifest(&self, label: &BackupLabel) -> Result<Option<Manifest>> {
        let key = Self::manifest_key(label);
        self.get_metadata(&key, &format!("manifest of backup {label} ('{key}') in repo {}", self.number)).await
    }

    /// Writes a metadata object (key relative to the stanza) in its
    /// checksummed envelope, encrypted when the repository is. With
    /// `create_only`, returns `false` when it already exists.
    pub async fn put_metadata<T: serde::Serialize>(&self, key: &str, value: &T, create_only: bool) -> Result<bool> {
        self.put_metadata_as(key, value, create_only, manifest::METADATA_FORMAT).await
    }

    /// As [`Self::put_metadata`], with `format` in the envelope.
    async fn put_metadata_as<T: serde::Serialize>(&self, key: &str, value: &T, create_only: bool, format: u32) -> Result<bool> {
        let sealed = match &self.cipher {
            Some(c) => Bytes::from(c.seal(&manifest::seal_as(value, format))?),
            None => manifest::seal_as(value, format),
        };
        self.store.put(key, sealed, create_only).await
    }

    /// Reads a metadata object written by [`Self::put_metadata`]; `None`
    /// when it does not exist. `what` names it in errors.
    pub async fn get_metadata<T: serde::de::DeserializeOwned>(&self, key: &str, what: &str) -> Result<Option<T>> {
        let Some(bytes) = self.store.get(key).await? else { return Ok(None) };
        manifest::unseal(&self.unseal_bytes(bytes, what)?, what).map(Some)
    }

    /// Reads the files of backup `m` one by one, in
    /// [`filelist::path_order`]: from its file list (format 3), or from
    /// the manifest (before). Call from a blocking thread.
    pub fn file_reader(&self, m: &Manifest) -> Result<Box<dyn Iterator<Item = Result<FileEntry>> + Send>> {
        let Some(list) = &m.file_list else {
            let mut files = m.inline_files.clone();
            files.sort_by(|a, b| filelist::path_order(&a.path, &b.path));
            return Ok(Box::new(files.into_iter().map(Ok)));
        };
        let what = format!("backup {} in repo {}", m.label, self.number);
        Ok(Box::new(filelist::ListReader::open(self, list, m.compress, &what)?))
    }

    /// Every file of backup `m`, in [`filelist::path_order`] (see
    /// [`Repository::file_reader`]), held whole: for tests; commands read
    /// the list as a stream.
    #[cfg(test)]
    pub async fn files(&self, m: &Manifest) -> Result<Vec<FileEntry>> {
        let (repo, m) = (self.clone(), m.clone());
        tokio::task::spawn_blocking(move || repo.file_reader(&m)?.collect()).await.map_err(Error::task("reading a file list"))?
    }

    /// Writes backup `m`'s file list from `files` (in
    /// [`filelist::path_order`]), then its manifest: for tests; a backup
    /// writes its list as it copies (`backup/copy.rs`).
    #[cfg(test)]
    pub async fn write_backup(&self, m: &mut Manifest, files: Vec<FileEntry>) -> Result<()> {
        let (repo, label, compress) = (self.clone(), m.label.clone(), m.compress);
        let list = tokio::task::spawn_blocking(move || {
            let mut w = filelist::ListWriter::create(&repo, &label, compress)?;
            files.iter().try_for_each(|f| w.push(f))?;
            w.finish()
        })
        .await
        .map_err(Error::task("writing a file list"))??;
        m.file_list = Some(list);
        m.inline_files.clear();
        self.write_manifest(m).await
    }

    /// All complete backups (those with a manifest), oldest first.
    pub async fn backups(&self) -> Result<Vec<Manifest>> {
        let mut labels = self.store.list_dirs(keys::BACKUP_DIR).await?;
        labels.sort();
        let mut out = Vec::new();
        for l in labels {
            out.extend(self.manifest(&BackupLabel(l)).await?);
        }
        Ok(out)
    }

    /// Removes a complete backup: the manifest first, so that it stops
    /// being listed, then its objects.
    pub async fn remove_backup(&self, label: &BackupLabel) -> Result<()> {
        self.store.delete_all(vec![Self::manifest_key(label)]).await?;
        self.remove_backup_objects(label).await
    }

    /// Deletes every object of a backup directory (used to clean up a
    /// backup that failed before its manifest was written), and in a local
    /// repository what a killed run left half written there.
    pub async fn remove_backup_objects(&self, label: &BackupLabel) -> Result<()> {
        self.store.delete_dir(&Self::backup_dir(label)).await
    }
}

impl StanzaMeta {
    fn same_cluster(&self, other: &StanzaMeta, number: usize, location: &str) -> Result<()> {
        if self.system_id != other.system_id {
            let why = match self.system(other.system_id) {
                Some(_) => "; the server is an older system of the stanza, replaced by stanza-upgrade",
                None => {
                    "; if the cluster was upgraded with pg_upgrade, run stanza-upgrade instead, else use another stanza name or repository"
                }
            };
            return Err(Error::Refused(format!(
                "repo {number} ({location}) holds stanza '{}' of another cluster (system identifier {}, this one is {}){why}",
                self.stanza, self.system_id, other.system_id
            )));
        }
        if self.pg_major() != other.pg_major() {
            return Err(Error::Refused(format!(
                "repo {number} ({location}) holds stanza '{}' for PostgreSQL {}, but the server is PostgreSQL {}; create a new stanza after a major upgrade",
                self.stanza,
                self.pg_major(),
                other.pg_major()
            )));
        }
        Ok(())
    }
}

impl Repository {
    /// The checksum named in archived WAL keys: BLAKE3, keyed when the
    /// repository is encrypted so that names reveal nothing of content.
    fn content_hash(&self, data: &[u8]) -> String {
        match &self.cipher {
            Some(c) => c.keyed_hash(data),
            None => blake3::hash(data).to_hex().to_string(),
        }
    }

    /// Decrypts a whole stored object when the repository is encrypted.
    fn unseal_bytes(&self, bytes: Bytes, what: &str) -> Result<Bytes> {
        match &self.cipher {
            Some(c) => Ok(Bytes::from(c.open_bytes(&bytes, what)?)),
            None => Ok(bytes),
        }
    }
}

/// The key of an encrypted stanza, or an error when the passphrase is
/// missing, wrong or given for an unencrypted stanza.
fn open_cipher(meta: &StanzaMeta, passphrase: Option<&[u8]>, number: usize) -> Result<Option<Cipher>> {
    let what = format!("repo {number} (stanza '{}')", meta.stanza);
    match (&meta.cipher, passphrase) {
        (Some(m), Some(p)) => Ok(Some(Cipher::open(p, m, &what)?)),
        (Some(_), None) => Err(Error::Input(format!("{what} is encrypted: set cipher-pass-file for it or PGKEEP_CIPHER_PASS"))),
        (None, Some(_)) => Err(Error::Input(format!(
            "{what} is not encrypted but a passphrase is set; remove cipher-pass-file / PGKEEP_CIPHER_PASS, or use a new repository"
        ))),
        (None, None) => Ok(None),
    }
}

/// Parses `<name>-<blake3><ext>` under `dir`.
fn parse_archived(dir: &str, l: Listed) -> Option<ArchivedWal> {
    let file = l.key.rsplit('/').next()?;
    let (name, rest) = file.rsplit_once('-')?;
    let (checksum, compress) = match rest.split_once('.') {
        Some((c, "zst")) => (c, Compress::Zstd),
        Some((c, "lz4")) => (c, Compress::Lz4),
        Some((c, "gz")) => (c, Compress::Gzip),
        None => (rest, Compress::None),
        _ => return None,
    };
    if checksum.len() != 64 || WalFileName::parse(name).is_none() {
        return None;
    }
    Some(ArchivedWal {
        name: name.to_owned(),
        key: format!("{dir}/{}", l.key),
        checksum: checksum.to_owned(),
        compress,
        size: l.size,
        modified: l.modified,
    })
}

/// Repository operations on an in-memory store, with failures injected
/// where the logic must hold against them.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::{Fault, Faulty, Op, Rule};

    fn meta() -> StanzaMeta {
        StanzaMeta::for_test(7)
    }

    async fn faulty_repo() -> (std::sync::Arc<Faulty>, Repository) {
        let faulty = Faulty::new(std::sync::Arc::new(object_store::memory::InMemory::new()));
        let store = Store::from_object_store(faulty.clone(), "faulty://");
        let (repo, created) = Repository::create(&store, meta(), 1, None).await.unwrap();
        assert!(created);
        (faulty, repo)
    }

    #[tokio::test]
    async fn a_wal_file_is_stored_once_and_never_overwritten_by_other_content() {
        let (_, repo) = faulty_repo().await;
        let name = WalFileName::History("00000002.history".into());
        assert_eq!(repo.push_wal(&name, b"1\t0/5000000\tx\n", Compress::Zstd, None).await.unwrap(), Pushed::Stored);
        assert_eq!(repo.push_wal(&name, b"1\t0/5000000\tx\n", Compress::Lz4, None).await.unwrap(), Pushed::AlreadyArchived);
        let e = repo.push_wal(&name, b"1\t0/6000000\ty\n", Compress::Zstd, None).await.unwrap_err();
        assert!(matches!(e, Error::Refused(_)) && e.to_string().contains("different content"), "{e}");
        assert_eq!(repo.get_wal(&name).await.unwrap(), b"1\t0/5000000\tx\n");
        assert_eq!(repo.find_wal(&name).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_store_that_fails_writes_leaves_nothing_and_says_to_try_again() {
        let (faulty, repo) = faulty_repo().await;
        let name = WalFileName::History("00000003.history".into());
        faulty.set(vec![Rule::new(Op::Put, "archive/", Fault::Fail)]);
        let e = repo.push_wal(&name, b"2\t0/7000000\tz\n", Compress::Zstd, None).await.unwrap_err();
        assert!(e.retryable(), "a store that does not take the write is worth another try: {e}");
        faulty.clear();
        assert!(repo.find_wal(&name).await.unwrap().is_empty(), "a failed write left an object");
        assert_eq!(repo.push_wal(&name, b"2\t0/7000000\tz\n", Compress::Zstd, None).await.unwrap(), Pushed::Stored);
        // A store that stops answering lists: an error, not "not archived".
        faulty.set(vec![Rule::new(Op::List, "", Fault::Fail)]);
        assert!(repo.find_wal(&name).await.unwrap_err().retryable());
    }

    #[tokio::test]
    async fn a_backup_exists_once_its_manifest_is_written_and_is_removed_whole() {
        let (faulty, repo) = faulty_repo().await;
        let t = chrono::Utc::now();
        let m = Manifest { system_id: SystemId(7), ..Manifest::for_test("20261201-100000F", BackupType::Full, None, t, 1000, (1, 2)) };
        let dir = Repository::backup_dir(&m.label);
        repo.store().put(&format!("{dir}/pg_data/PG_VERSION"), "15".into(), false).await.unwrap();
        assert!(repo.backups().await.unwrap().is_empty(), "no manifest, no backup");
        faulty.set(vec![Rule::new(Op::Put, "manifest.json", Fault::Fail)]);
        assert!(repo.write_manifest(&m).await.is_err());
        assert!(repo.backups().await.unwrap().is_empty(), "a manifest that failed to be written is no backup");
        faulty.clear();
        repo.write_manifest(&m).await.unwrap();
        assert_eq!(repo.backups().await.unwrap().iter().map(|b| b.label.clone()).collect::<Vec<_>>(), std::slice::from_ref(&m.label));
        repo.remove_backup(&m.label).await.unwrap();
        assert!(repo.backups().await.unwrap().is_empty());
        assert!(repo.store().list(&dir).await.unwrap().is_empty(), "objects of a removed backup remain");
    }

    /// A backup of format 3 keeps its files in a list of their own and is
    /// written as format 3; one of format 2 (files in the manifest, sorted
    /// by bytes, as older pgkeep wrote them) reads the same, in path order,
    /// with the same page checksum summary; a list that fails to be
    /// written leaves no backup.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backups_of_format_2_and_3_give_the_same_files_in_path_order() {
        let (faulty, repo) = faulty_repo().await;
        let t = chrono::Utc::now();
        let entry = |path: &str, errors: Vec<u32>| FileEntry { checksum_errors: errors, ..FileEntry::for_test(path, 8192, 0) };
        let mut by_bytes = vec![entry("base/1.x", vec![]), entry("base/1/2", vec![3, 4]), entry("global/pg_control", vec![])];
        by_bytes.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(by_bytes[0].path, "base/1.x", "byte order puts it first");
        let mut in_order = by_bytes.clone();
        in_order.sort_by(|a, b| filelist::path_order(&a.path, &b.path));
        assert_eq!(in_order[0].path, "base/1/2");

        let old = Manifest {
            system_id: SystemId(7),
            inline_files: by_bytes.clone(),
            ..Manifest::for_test("20261201-100000F", BackupType::Full, None, t, 1000, (1, 2))
        };
        repo.write_manifest(&old).await.unwrap();
        let mut new =
            Manifest { system_id: SystemId(7), ..Manifest::for_test("20261201-110000F", BackupType::Full, None, t, 1000, (1, 2)) };
        new.checksum_error_files = ChecksumErrorFile::of(&in_order);
        faulty.set(vec![Rule::new(Op::Put, "files.jsonl", Fault::Fail)]);
        assert!(repo.write_backup(&mut new.clone(), in_order.clone()).await.is_err());
        faulty.clear();
        assert_eq!(repo.backups().await.unwrap().len(), 1, "a backup whose list failed to be written does not exist");
        repo.write_backup(&mut new, in_order.clone()).await.unwrap();

        let envelope = |label: &str| {
            let repo = &repo;
            let key = keys::manifest(&BackupLabel(label.into()));
            async move { serde_json::from_slice::<serde_json::Value>(&repo.store().get(&key).await.unwrap().unwrap()).unwrap() }
        };
        assert_eq!(envelope("20261201-100000F").await["format"], 2);
        let written = envelope("20261201-110000F").await;
        assert_eq!(written["format"], 3);
        assert!(written["content"].get("files").is_none(), "format 3 keeps no files in the manifest");

        let backups = repo.backups().await.unwrap();
        assert_eq!(backups.len(), 2);
        for m in &backups {
            assert_eq!(repo.files(m).await.unwrap(), in_order, "{}", m.label);
            assert_eq!(m.file_count(), 3);
            assert_eq!(m.checksum_error_files(), vec![ChecksumErrorFile { path: "base/1/2".into(), pages: 2 }]);
            assert_eq!(m.checksum_error_pages(), 2);
        }
    }

    #[tokio::test]
    async fn after_stanza_upgrade_each_system_has_its_own_archive_and_only_the_current_one_takes_wal() {
        let (faulty, repo) = faulty_repo().await;
        let store = Store::from_object_store(faulty, "faulty://");
        let name = WalFileName::History("00000002.history".into());
        repo.push_wal(&name, b"old system", Compress::Zstd, None).await.unwrap();
        let t = chrono::Utc::now();
        let upgraded = repo.meta.upgraded(SystemId(8), 180001, 32 << 20, t);
        repo.store().put(STANZA_FILE, manifest::seal(&upgraded), false).await.unwrap();

        let now = Repository::open(&store, "demo", 1, None).await.unwrap();
        let ids: Vec<(u32, SystemId, u32)> = now.meta.systems().iter().map(|s| (s.id, s.system_id, s.pg_major())).collect();
        assert_eq!(ids, vec![(1, SystemId(7), 15), (2, SystemId(8), 18)]);
        assert_eq!((now.system.system_id, now.system.wal_segment_size), (SystemId(8), 32 << 20));
        // The same name in each system's archive, each with its content.
        assert!(now.find_wal(&name).await.unwrap().is_empty(), "the old system's WAL shows in the new one's archive");
        now.push_wal(&name, b"new system", Compress::Zstd, None).await.unwrap();
        assert!(now.find_wal(&name).await.unwrap()[0].key.starts_with("archive-2/history/"));
        let old = now.for_system(SystemId(7), "test").unwrap();
        assert_eq!(old.get_wal(&name).await.unwrap(), b"old system");
        assert_eq!(now.get_wal(&name).await.unwrap(), b"new system");
        // Only the current system takes WAL or backups; the others say why.
        now.check_system_id(SystemId(8), "x").unwrap();
        let e = now.check_system_id(SystemId(7), "WAL file x").unwrap_err();
        assert!(e.to_string().contains("held before system 8"), "{e}");
        let e = now.check_system_id(SystemId(9), "WAL file x").unwrap_err();
        assert!(e.to_string().contains("pg_upgrade"), "{e}");
        assert!(matches!(e.hint(), Some(Hint::AnyOf { hints }) if hints[0] == Hint::run(Operation::StanzaUpgrade)), "{e:?}");
        assert!(now.for_system(SystemId(9), "the cluster asking for WAL").is_err());
        // A stanza-create from the new system accepts the stanza; from the
        // old one it is refused.
        let (_, created) =
            Repository::create(&store, StanzaMeta { system_id: SystemId(8), pg_version: 180001, ..meta() }, 1, None).await.unwrap();
        assert!(!created);
        let e = Repository::create(&store, meta(), 1, None).await.unwrap_err();
        assert!(e.to_string().contains("older system"), "{e}");
    }

    #[tokio::test]
    async fn a_second_stanza_create_for_another_system_is_refused() {
        let (faulty, repo) = faulty_repo().await;
        let store = Store::from_object_store(faulty, "faulty://");
        let (again, created) = Repository::create(&store, meta(), 1, None).await.unwrap();
        assert!(!created && again.meta.system_id == repo.meta.system_id);
        let other = StanzaMeta { system_id: SystemId(8), ..meta() };
        let e = Repository::create(&store, other, 1, None).await.unwrap_err();
        assert!(e.to_string().contains('8') && e.to_string().contains('7'), "{e}");
    }
}
