//! `archive-push` and `archive-get`: PostgreSQL's `archive_command` and
//! `restore_command`.
//!
//! Push sends the file to every repository and succeeds only when all of
//! them hold it, so PostgreSQL keeps (and retries) a segment until it is
//! safe everywhere. Get tries the repositories in order and reports
//! [`Error::NotFound`] only when none has the file and every one answered;
//! any other failure (a corrupt object, a store that does not answer) is
//! an error that must stop recovery.

use std::path::Path;

use crate::error::{Error, Result};
use crate::pg::wal_system_id;
use crate::repo::{Pushed, Repository};
use crate::types::WalFileName;
use crate::Stanza;

/// Archives the WAL file at `path` into every repository.
pub async fn push(stanza: &Stanza, path: &Path) -> Result<Vec<Pushed>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let name = WalFileName::parse(name).ok_or_else(|| {
        Error::Input(format!(
            "{} is not a WAL, partial, history or backup history file; archive-push takes the %p of archive_command",
            path.display()
        ))
    })?;
    let data = std::fs::read(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
    let repos = stanza.open_all().await?;
    if matches!(name, WalFileName::Segment(_) | WalFileName::Partial(_)) {
        let seg = repos[0].meta.wal_segment_size;
        if data.len() as u64 != seg {
            return Err(Error::Refused(format!(
                "{} has {} bytes but the stanza's WAL segments have {seg}; is this the right stanza?",
                path.display(),
                data.len()
            )));
        }
        let id = wal_system_id(&data)
            .ok_or_else(|| Error::Refused(format!("{} does not start with a WAL page header; it is not a WAL segment", path.display())))?;
        for r in &repos {
            r.check_system_id(id, &format!("WAL file {}", name.as_str()))?;
        }
    }
    let mut out = Vec::new();
    for (r, opts) in repos.iter().zip(&stanza.settings.repos) {
        out.push(r.push_wal(&name, &data, opts.compress.unwrap_or_default(), opts.compress_level).await?);
    }
    Ok(out)
}

/// Writes archived WAL file `name` to `dest` (atomically: a temporary file
/// beside it, fsynced, then renamed).
pub async fn get(stanza: &Stanza, name: &str, dest: &Path) -> Result<()> {
    let name = WalFileName::parse(name)
        .ok_or_else(|| Error::Input(format!("'{name}' is not a WAL file name; archive-get takes the %f and %p of restore_command")))?;
    let mut last_missing = None;
    for number in 1..=stanza.settings.repos.len() {
        let repo = stanza.open(number).await?;
        match repo.get_wal(&name).await {
            Ok(data) => return write_atomically(dest, &data),
            Err(e @ Error::NotFound(_)) => last_missing = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_missing.unwrap_or_else(|| Error::NotFound(format!("WAL file {} is not in the archive", name.as_str()))))
}

fn write_atomically(dest: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = dest.with_extension("pgkeep.tmp");
    let what = || format!("cannot write {}", dest.display());
    let mut f = std::fs::File::create(&tmp).map_err(Error::io(what()))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(Error::io(what()))?;
    std::fs::rename(&tmp, dest).map_err(Error::io(what()))
}

/// Helper used by `check` and `backup`: waits until `segment` is in `repo`.
pub async fn wait_archived(repo: &Repository, segment: &str, timeout_secs: u64) -> Result<()> {
    let name = WalFileName::parse(segment).ok_or_else(|| Error::Input(format!("'{segment}' is not a WAL file name")))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
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
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Finds the newest `pg_create_restore_point` record named `name` in the
/// archive, scanning segments newest first and stopping before `from`.
/// Returns its LSN. A record split across a page boundary is not seen;
/// the caller then asks for `--set`.
pub async fn find_restore_point(repo: &Repository, name: &str, from: crate::types::Lsn) -> Result<Option<crate::types::Lsn>> {
    let seg = repo.meta.wal_segment_size;
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
