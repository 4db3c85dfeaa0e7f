//! `archive-push` and `archive-get`: PostgreSQL's `archive_command` and
//! `restore_command`.
//!
//! Push sends the file to every repository, each on its own, and succeeds
//! only when all of them hold it, so PostgreSQL keeps (and retries) a
//! segment until it is safe everywhere, while a repository that is down
//! does not keep it from the others. Get takes the file from the first
//! repository that has it (a good copy elsewhere outweighs one that is
//! down or corrupt) and reports [`Error::NotFound`] only when every
//! repository answered that it has not; any other failure must stop
//! recovery.

use std::path::Path;

use crate::codec::Compress;
use crate::error::{Error, Result};
use crate::pg::{version, wal_system_id};
use crate::repo::{Pushed, Repository};
use crate::types::WalFileName;
use crate::Stanza;

pub mod async_push;
pub mod prefetch;
pub mod spool;
mod tasks;

/// The kind of WAL file at `path`, from its name.
fn parse_name(path: &Path) -> Result<WalFileName> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    WalFileName::parse(name).ok_or_else(|| {
        Error::Input(format!(
            "{} is not a WAL, partial, history or backup history file; archive-push takes the %p of archive_command",
            path.display()
        ))
    })
}

/// Archives the WAL file at `path` into every repository.
pub async fn push(stanza: &Stanza, path: &Path) -> Result<Vec<Pushed>> {
    let name = parse_name(path)?;
    let data = std::fs::read(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
    // Each repository on its own: one that is down must not keep the file
    // from the others (PostgreSQL retries until all have it).
    let mut stored = Vec::new();
    let mut failed: Vec<(usize, Error)> = Vec::new();
    let mut packed = Packed::default();
    for (i, opts) in stanza.settings.repos.iter().enumerate() {
        let number = i + 1;
        let attempt = async {
            let r = stanza.open(number).await?;
            check_wal_file(&r, &name, &data, path)?;
            let compress = opts.compress.unwrap_or_default();
            let bytes = packed.get(compress, opts.compress_level, &data)?;
            r.push_packed_wal(&name, &data, compress, &bytes).await
        };
        match attempt.await {
            Ok(p) => stored.push((number, p)),
            Err(e) => failed.push((number, e)),
        }
    }
    match (failed.len(), stored.is_empty()) {
        (0, _) => Ok(stored.into_iter().map(|(_, p)| p).collect()),
        // Nowhere: the first repository's own error says what is wrong.
        (_, true) => Err(failed.into_iter().next().expect("a failure").1),
        (_, false) => {
            let ok: Vec<String> = stored.iter().map(|(n, _)| n.to_string()).collect();
            let why: Vec<String> = failed.iter().map(|(n, e)| format!("repo {n}: {}", crate::error::OneLine(e))).collect();
            Err(Error::Refused(format!(
                "{} is archived in repo {} but not in {}; PostgreSQL keeps the file and retries",
                name.as_str(),
                ok.join(", "),
                why.join("; ")
            )))
        }
    }
}

/// A WAL file compressed once per codec and level, shared by the
/// repositories that use the same ones.
#[derive(Default)]
pub(crate) struct Packed(Vec<(Codec, std::sync::Arc<Vec<u8>>)>);

/// A codec and its level.
pub(crate) type Codec = (Compress, Option<i32>);

impl Packed {
    /// The file as already compressed with `compress` at `level`.
    pub(crate) fn find(&self, compress: Compress, level: Option<i32>) -> Option<std::sync::Arc<Vec<u8>>> {
        self.0.iter().find(|(k, _)| *k == (compress, level)).map(|(_, b)| b.clone())
    }

    /// The file compressed with `compress` at `level`.
    pub(crate) fn get(&mut self, compress: Compress, level: Option<i32>, data: &[u8]) -> Result<std::sync::Arc<Vec<u8>>> {
        if let Some(b) = self.find(compress, level) {
            return Ok(b);
        }
        let b = std::sync::Arc::new(crate::codec::compress_bytes(compress, level, data).map_err(Error::io("cannot compress WAL"))?);
        self.0.push(((compress, level), b.clone()));
        Ok(b)
    }
}

/// Refuses a file of a cluster the stanza takes no WAL of: one whose data
/// directory (the `global/pg_control` of `archive_command`'s working
/// directory, which chose `repo`'s system) is of an older system of the
/// stanza, whatever the file (timeline history files carry no system of
/// their own); and a segment of another cluster, of another major (its
/// page magic) or of the wrong size.
pub(crate) fn check_wal_file(repo: &Repository, name: &WalFileName, data: &[u8], path: &Path) -> Result<()> {
    let current = repo.meta.current();
    if repo.system.system_id != current.system_id {
        let what = format!("{} of the cluster archiving it (by its global/pg_control)", name.as_str());
        repo.for_system(current.system_id, "the stanza's current system")?.check_system_id(repo.system.system_id, &what)?;
    }
    if matches!(name, WalFileName::Segment(_) | WalFileName::Partial(_)) {
        // The system first: a new system after pg_upgrade may have
        // another segment size, and what to do about it is stanza-upgrade.
        let id = wal_system_id(data)
            .ok_or_else(|| Error::Refused(format!("{} does not start with a WAL page header; it is not a WAL segment", path.display())))?;
        repo.check_system_id(id, &format!("WAL file {}", name.as_str()))?;
        // The same system of another major cannot be (pg_upgrade makes a
        // new system), so this catches what the identifier cannot: a
        // segment that is not WAL of this major at all.
        version::check_wal_major(data, repo.system.pg_version, &format!("WAL file {}", name.as_str()))?;
        let seg = repo.system.wal_segment_size;
        if data.len() as u64 != seg {
            return Err(Error::Refused(format!(
                "{} has {} bytes but the stanza's WAL segments have {seg}; is this the right stanza?",
                path.display(),
                data.len()
            )));
        }
    }
    Ok(())
}

/// Writes archived WAL file `name` to `dest` (atomically: a temporary file
/// beside it, fsynced, then renamed).
pub async fn get(stanza: &Stanza, name: &str, dest: &Path) -> Result<()> {
    let name = parse_get_name(name)?;
    let data = fetch(stanza, &name).await?;
    spool::write_durably(dest, &data)
}

fn parse_get_name(name: &str) -> Result<WalFileName> {
    WalFileName::parse(name)
        .ok_or_else(|| Error::Input(format!("'{name}' is not a WAL file name; archive-get takes the %f and %p of restore_command")))
}

/// Reads archived WAL file `name` from the first repository that has it.
async fn fetch(stanza: &Stanza, name: &WalFileName) -> Result<Vec<u8>> {
    // The first repository that has it serves it. `NotFound` only when
    // every repository answered that it has not: a repository that failed
    // (down, or a corrupt copy) while no other had the file must stop
    // recovery rather than look like the end of the archive.
    // A repository that has never held the asking system (stanza-upgrade
    // has not reached it yet) holds none of its WAL: "not here" when
    // another repository holds the system, else the stanza has no such
    // system at all, which stops recovery.
    let mut missing = None;
    let mut failure = None;
    let mut never_held = None;
    for number in 1..=stanza.settings.repos.len() {
        let attempt = async {
            match stanza.open_serving(number).await? {
                Ok(repo) => {
                    let data = repo.get_wal(name).await?;
                    check_served(&repo, name, &data)?;
                    Ok::<_, Error>(Ok(data))
                }
                Err(refused) => Ok(Err(refused)),
            }
        };
        match attempt.await {
            Ok(Ok(data)) => return Ok(data),
            Ok(Err(refused)) => never_held = never_held.or(Some(refused)),
            Err(e) if matches!(e.kind(), Error::NotFound(_)) => missing = Some(e),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    Err(failure.or(missing).or(never_held).unwrap_or_else(|| Error::NotFound(format!("WAL file {} is not in the archive", name.as_str()))))
}

/// Refuses to hand recovery a segment that is not the asking system's WAL
/// (by the system identifier and page magic of its first page): an object
/// put in the archive by hand, or a repository that mixes systems, must
/// stop recovery rather than replay another cluster's changes.
pub(super) fn check_served(repo: &Repository, name: &WalFileName, data: &[u8]) -> Result<()> {
    if !matches!(name, WalFileName::Segment(_) | WalFileName::Partial(_)) {
        return Ok(());
    }
    let what = format!("archived WAL file {} in repo {}", name.as_str(), repo.number);
    let id = wal_system_id(data).ok_or_else(|| Error::Corrupt(format!("{what} does not start with a WAL page header")))?;
    if id != repo.system.system_id {
        return Err(Error::Corrupt(format!(
            "{what} is of system {id}, but the cluster recovering is system {}; the archive holds another cluster's WAL under this name",
            repo.system.system_id
        )));
    }
    version::check_wal_major(data, repo.system.pg_version, &what)
}

/// Helper used by `check` and `backup`: waits until `segment` is in `repo`.
pub async fn wait_archived(repo: &Repository, segment: &str, timeout_secs: u64) -> Result<()> {
    let name = WalFileName::parse(segment).ok_or_else(|| Error::Input(format!("'{segment}' is not a WAL file name")))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    // The segment usually arrives within tens of milliseconds of the switch
    // (one archive-push): look again soon at first, then every 250 ms.
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        if !repo.find_wal(&name).await?.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Refused(format!(
                "WAL segment {segment} did not reach repo {} within {timeout_secs}s; check archive_mode and that archive_command runs `pgkeep archive-push %p` for stanza '{}' (see pg_stat_archiver)",
                repo.number, repo.meta.stanza
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(250));
    }
}

/// Finds the newest `pg_create_restore_point` record named `name` in the
/// archive, scanning segments newest first and stopping before `from`.
/// Returns its LSN. A record split across a page boundary is not seen;
/// the caller then asks for `--set`.
pub async fn find_restore_point(repo: &Repository, name: &str, from: crate::types::Lsn) -> Result<Option<crate::types::Lsn>> {
    let seg = repo.system.wal_segment_size;
    let mut segments = repo.list_segments().await?;
    segments.sort_by_key(|(s, _)| (s.timeline, s.number));
    for (s, w) in segments.into_iter().rev() {
        if s.end_lsn(seg) <= from {
            break;
        }
        let data = repo.get_wal(&WalFileName::Segment(w.name.clone())).await?;
        if let Some(offset) = restore_point_offset(&data, name) {
            return Ok(Some(crate::types::Lsn(s.number * seg + offset as u64)));
        }
    }
    Ok(None)
}

/// Offset of the last restore point record named `name` in a segment.
/// The record is an `XLogRecord` header (24 bytes; `xl_info` 0x70 =
/// XLOG_RESTORE_POINT at 16, `xl_rmid` 0 = RM_XLOG_ID at 17), then
/// XLR_BLOCK_ID_DATA_SHORT (255) and the data length 72, then
/// `xl_restore_point`: an 8-byte time and the NUL-terminated name.
fn restore_point_offset(segment: &[u8], name: &str) -> Option<usize> {
    let name = name.as_bytes();
    if name.is_empty() || name.len() >= 64 {
        return None;
    }
    (0..segment.len().saturating_sub(98)).step_by(8).rev().find(|&p| {
        let r = &segment[p..p + 98];
        r[16] == 0x70 && r[17] == 0 && r[24] == 255 && r[25] == 72 && &r[34..34 + name.len()] == name && r[34 + name.len()] == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After stanza-upgrade, a cluster of the older system (its data
    /// directory says which) archives nothing into the stanza, not even a
    /// timeline history file, which carries no system of its own and would
    /// otherwise land in the current system's archive (where recovery of
    /// the new system would follow it).
    #[tokio::test]
    async fn a_cluster_of_an_older_system_archives_nothing_not_even_a_history_file() {
        use crate::repo::StanzaMeta;
        use crate::types::SystemId;
        let meta = StanzaMeta::for_test(7).upgraded(SystemId(8), 180000, 16 << 20, chrono::Utc::now());
        let (repo, _) = Repository::create(&crate::storage::Store::memory(), meta, 1, None).await.unwrap();
        let hist = WalFileName::History("00000002.history".into());
        let path = Path::new("pg_wal/00000002.history");
        let old = repo.for_system(SystemId(7), "test").unwrap();
        let e = check_wal_file(&old, &hist, b"1\t0/5000000\tx\n", path).unwrap_err();
        assert!(e.to_string().contains("held before system 8"), "{e}");
        check_wal_file(&repo, &hist, b"1\t0/5000000\tx\n", path).unwrap();
    }

    /// archive-get for a system that stanza-upgrade has recorded in one
    /// repository but not yet in the other: that repository holds none of
    /// its WAL, which is "not here", not a failure that stops recovery; a
    /// system no repository holds stops it.
    #[tokio::test]
    async fn a_repository_that_never_held_the_asking_system_is_not_a_failure_unless_none_holds_it() {
        use crate::repo::StanzaMeta;
        use crate::types::SystemId;
        let t = tempfile::tempdir().unwrap();
        let text = format!(
            "[stanza.demo]\npg-data = \"/x\"\n[[repo]]\nlocation = \"{d}/r1\"\n[[repo]]\nlocation = \"{d}/r2\"\n",
            d = t.path().display()
        );
        let file = crate::config::ConfigFile::parse(&text).unwrap();
        let stanza = Stanza::new(crate::config::Settings::resolve(&file, Some("demo"), Default::default(), Default::default(), 1).unwrap());
        let meta = StanzaMeta::for_test(7);
        Repository::create(&stanza.store(1).unwrap(), meta.clone().upgraded(SystemId(8), 180000, 16 << 20, chrono::Utc::now()), 1, None)
            .await
            .unwrap();
        Repository::create(&stanza.store(2).unwrap(), meta, 2, None).await.unwrap();
        let hist = WalFileName::History("00000002.history".into());
        stanza.open(1).await.unwrap().push_wal(&hist, b"new", Compress::Zstd, None).await.unwrap();

        let new = stanza.clone().serving_system(Some(SystemId(8)));
        assert_eq!(fetch(&new, &hist).await.unwrap(), b"new");
        let later = WalFileName::History("00000003.history".into());
        let e = fetch(&new, &later).await.unwrap_err();
        assert!(matches!(e.kind(), Error::NotFound(_)), "{e}");
        let e = fetch(&stanza.serving_system(Some(SystemId(9))), &hist).await.unwrap_err();
        assert!(matches!(e.kind(), Error::Refused(_)) && e.hint().is_some(), "{e}");
    }

    #[test]
    fn finds_a_restore_point_record_by_name() {
        let mut seg = vec![0u8; 8192 * 4];
        let at = 8192 + 40;
        seg[at + 16] = 0x70;
        seg[at + 24] = 255;
        seg[at + 25] = 72;
        seg[at + 34..at + 37].copy_from_slice(b"rp1");
        assert_eq!(restore_point_offset(&seg, "rp1"), Some(at));
        assert_eq!(restore_point_offset(&seg, "rp"), None, "a prefix is not the name");
        assert_eq!(restore_point_offset(&seg, "rp12"), None);
        seg[at + 17] = 1;
        assert_eq!(restore_point_offset(&seg, "rp1"), None, "another resource manager");
    }
}
