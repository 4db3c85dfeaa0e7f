//! Restore: write a backup's files into a data directory and the recovery
//! settings that make PostgreSQL, once started, fetch WAL with
//! `pgkeep archive-get` and stop at the target.
//!
//! Safety:
//! - a running cluster is never touched, a non-empty directory only with
//!   `force`;
//! - every file is checked against its checksum and size as it is written;
//! - `backup_label` and the recovery settings are written and synced, and
//!   every directory synced, before `global/pg_control`, written last: a
//!   restore that stops halfway leaves a directory PostgreSQL refuses to
//!   start (no `pg_control`), never one it would start from the copied
//!   checkpoint instead of the backup's start; on failure the files
//!   written are removed again.

mod chain;
mod choose;
mod destination;
mod files;
mod recovery;
pub mod target;

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Result;
use crate::progress::{Progress, Step};
use crate::types::BackupLabel;
use crate::Stanza;
use choose::Plan;
pub(crate) use files::{read_piece, read_stored, Scratch, Source};
pub use recovery::{parse_timeline, recovery_settings};
pub use target::{Target, TargetAction};

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Destination; default the stanza's pg-data.
    pub pg_data: Option<PathBuf>,
    /// Backup to restore; default chosen for the target.
    pub set: Option<BackupLabel>,
    /// Recovery target; `None` is the end of the archive.
    pub target: Option<Target>,
    /// Stop just before the target instead of just after.
    pub exclusive: bool,
    /// What to do at the target.
    pub action: TargetAction,
    /// `recovery_target_timeline`: latest, current or a number.
    pub timeline: Option<String>,
    /// Replace the contents of a non-empty destination.
    pub force: bool,
    /// Restore into an existing data directory, rewriting only the files
    /// whose content differs from the backup's and removing the files the
    /// backup does not have.
    pub delta: bool,
    /// Tablespace destinations by OID or name: (oid-or-name, directory).
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// With `force`, also empty tablespace directories outside the data
    /// directory that `tablespace_map` does not point elsewhere (the
    /// original locations, in use by the cluster being replaced).
    pub force_tablespaces: bool,
    /// Whether the restored cluster archives WAL; `None`: as the source
    /// did when restoring into the stanza's own pg-data, off elsewhere (a
    /// clone must not archive into the stanza's repository unless asked).
    pub archive_mode: Option<ArchiveMode>,
    /// The `restore_command` to write (the front end knows how it was run).
    pub restore_command: String,
    /// Make the restored cluster a standby (`standby.signal`): it replays
    /// the archive and then, with `primary_conninfo`, streams. No
    /// recovery target goes with it.
    pub standby: bool,
    /// With `standby`: the `primary_conninfo` to write.
    pub primary_conninfo: Option<String>,
    /// Where to count progress.
    pub progress: Option<Arc<Progress>>,
    /// The caller writes PostgreSQL's recovery settings itself, elsewhere
    /// than `postgresql.auto.conf` (CloudNativePG: its `custom.conf`):
    /// write none there, and drop the recovery, archive and replication
    /// settings the backup's copy holds, which would override the
    /// caller's (the file is read last and copied to every replica).
    pub settings_elsewhere: bool,
}

/// What a restore did (as JSON with the field names in kebab-case, `size`
/// for `bytes`, `unchanged-files` and `target-timeline`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreReport {
    /// Backup restored.
    pub label: BackupLabel,
    /// Repository it came from.
    pub repo: usize,
    /// Destination.
    pub pg_data: PathBuf,
    /// Files and bytes written.
    pub files: usize,
    /// Bytes of the restored database.
    #[serde(rename = "size")]
    pub bytes: u64,
    /// Files left as they were because they already held the backup's
    /// content (`delta`).
    #[serde(rename = "unchanged-files")]
    pub unchanged: usize,
    /// Files and directories removed because the backup does not have
    /// them (`delta`).
    pub removed: usize,
    /// What was decided for archiving in the restored cluster.
    pub archive_mode: ArchiveMode,
    /// The `recovery_target_timeline` written, if any.
    #[serde(rename = "target-timeline")]
    pub timeline: Option<String>,
    /// Restored as a standby.
    pub standby: bool,
}

/// `restore --archive-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveMode {
    /// Write `archive_mode = off`: the restored cluster archives nothing.
    Off,
    /// Keep the source's archiving settings.
    Preserve,
}

/// Restores as `opts` says: the list of steps, one module each.
pub async fn run(stanza: &Stanza, opts: &RestoreOptions) -> Result<RestoreReport> {
    // 1. Choose the backup that reaches the target, and its chain; check
    //    the destination and the archive.
    let plan = choose::plan(stanza, opts).await?;
    let archive_mode = opts.archive_mode.unwrap_or(if plan.in_place { ArchiveMode::Preserve } else { ArchiveMode::Off });
    let opts = &RestoreOptions { timeline: plan.timeline.clone(), archive_mode: Some(archive_mode), ..opts.clone() };
    // 2. Prepare the destination.
    let created = destination::prepare_dirs(&plan, opts.force && !opts.delta)?;
    match write(&plan, opts, stanza.settings.jobs).await {
        Ok(report) => Ok(report),
        // A delta restore has already changed a directory that held data:
        // it cannot go back, but without pg_control (written last) the
        // directory will not start half-restored; run the restore again.
        Err(e) if opts.delta => Err(e),
        Err(e) => {
            for dir in created.iter().rev() {
                let _ = destination::clear_dir(dir);
            }
            Err(e)
        }
    }
}

/// Steps 3 to 5: the files, then what tells PostgreSQL where to start
/// recovery (before pg_control, which alone would let it start from the
/// copied checkpoint): backup_label and the recovery settings, every
/// directory synced, and pg_control last.
async fn write(plan: &Plan, opts: &RestoreOptions, jobs: usize) -> Result<RestoreReport> {
    let (m, root) = (&plan.chain[0], &plan.pg_data);
    // A delta restore first sets pg_control aside, so that the directory
    // does not start while it is half rewritten, and removes what the
    // backup does not have.
    let removed = if opts.delta { destination::clear_for_delta(&plan.repo, root, m).await? } else { 0 };
    files::make_dirs(plan)?;
    let step = |s| opts.progress.as_ref().inspect(|p| p.step(s));
    let writer = files::Writer::new(plan, opts);
    step(Step::Copying);
    let (unchanged, control) = writer.write_all_but_control(jobs).await?;
    step(Step::Finishing);
    files::sync_written(plan, jobs).await?;
    recovery::write_label_and_settings(root, m, opts)?;
    files::sync_dirs(root, m)?;
    writer.write_control(control).await?;
    destination::check_control(root, m)?;
    destination::done_with_delta(root, opts.delta)?;
    Ok(RestoreReport {
        label: m.label.clone(),
        repo: plan.repo.number,
        pg_data: root.clone(),
        files: m.file_count() as usize,
        bytes: m.size,
        unchanged,
        removed,
        archive_mode: opts.archive_mode.unwrap_or(ArchiveMode::Preserve),
        timeline: opts.timeline.clone(),
        standby: opts.standby,
    })
}

#[cfg(test)]
mod tests {
    use super::destination::*;
    use super::files::*;
    use super::*;
    use crate::codec::Compress;
    use crate::error::Error;
    use crate::repo::manifest::Part;
    use crate::repo::FileEntry;
    use std::ops::Range;

    fn entry(size: u64, delta: bool, parts: &[(u64, u64)]) -> FileEntry {
        FileEntry {
            checksum: if parts.is_empty() { format!("whole-{size}") } else { String::new() },
            key: parts.is_empty().then(|| format!("k{size}")),
            repo_size: 1,
            delta,
            parts: parts
                .iter()
                .map(|&(start, size)| Part {
                    start,
                    size,
                    key: Some(format!("p{start}")),
                    repo_size: 1,
                    checksum: format!("c{start}"),
                    pages: 0,
                    content: delta.then(|| format!("content{start}")),
                })
                .collect(),
            ..FileEntry::for_test("base/5/16384", size, 0)
        }
    }

    #[test]
    fn units_of_files_in_parts_are_spread_so_workers_write_different_files() {
        // Files 0 and 1 in parts, 2 and 3 of one unit, 4 in parts.
        let files: Vec<Vec<(usize, u32)>> =
            [(0, 4), (1, 3), (2, 1), (3, 1), (4, 2)].iter().map(|&(f, n)| (0..n).map(|k| (f, k)).collect()).collect();
        let run = |jobs| {
            let mut s = Schedule::new(jobs);
            let (mut files, mut order) = (files.clone().into_iter(), Vec::new());
            loop {
                while s.wants_more() {
                    match files.next() {
                        Some(units) => s.add(units),
                        None => break,
                    }
                }
                match s.take() {
                    Some(u) => order.push(u),
                    None => return order,
                }
            }
        };
        let order = run(2);
        assert_eq!(order.iter().map(|(f, _)| *f).collect::<Vec<_>>(), [0, 1, 0, 1, 0, 1, 2, 3, 0, 4, 4]);
        let parts0: Vec<u32> = order.iter().filter(|(f, _)| *f == 0).map(|(_, k)| *k).collect();
        assert_eq!(parts0, [0, 1, 2, 3], "each file's units stay in order");
        // One worker: in list order.
        assert_eq!(run(1).iter().map(|(f, _)| *f).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 4]);
    }

    #[test]
    fn a_file_in_parts_restores_as_one_unit_per_part_reading_every_piece_that_overlaps() {
        const P: u64 = 100;
        // A whole copy of 150 bytes, then a delta in parts after the file
        // grew to 250 bytes.
        let base = entry(150, false, &[]);
        let incr = entry(250, true, &[(0, P), (P, P), (2 * P, 50)]);
        let layers = vec![(&base, Compress::Zstd), (&incr, Compress::Lz4)];
        let units = restore_units(&incr, &layers);
        let shape: Vec<(Range<u64>, Vec<String>)> =
            units.iter().map(|u| (u.range.clone(), u.pieces.iter().map(|(p, _)| p.key.clone().unwrap()).collect())).collect();
        assert_eq!(
            shape,
            vec![
                (0..P, vec!["k150".to_string(), "p0".into()]),
                (P..2 * P, vec!["k150".to_string(), "p100".into()]),
                (2 * P..250, vec!["p200".to_string()]),
            ]
        );
        assert_eq!(units[1].expect.as_deref(), Some("content100"), "a delta part compares by its content hash");
        assert_eq!(units[1].pieces[1].1, Compress::Lz4, "each piece keeps its backup's compression");

        // Cut to 120 bytes since a backup in parts: the parts past the end
        // are not read; the unit ends at the new size.
        let big = entry(300, false, &[(0, P), (P, P), (2 * P, P)]);
        let cut = entry(120, true, &[]);
        let units = restore_units(&cut, &[(&big, Compress::Zstd), (&cut, Compress::Zstd)]);
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].range, 0..120);
        let keys: Vec<String> = units[0].pieces.iter().map(|(p, _)| p.key.clone().unwrap()).collect();
        assert_eq!(keys, ["p0", "p100", "k120"]);
        assert_eq!(units[0].expect.as_deref(), Some("whole-120"));
    }

    #[test]
    fn writes_the_target_settings_postgres_reads() {
        let opts = RestoreOptions {
            target: Some(Target::Xid(42)),
            exclusive: true,
            action: TargetAction::Pause,
            timeline: Some("current".into()),
            restore_command: "/usr/bin/pgkeep --stanza it's archive-get %f \"%p\"".into(),
            ..Default::default()
        };
        let lines = recovery_settings(&BackupLabel("L".into()), &opts);
        assert_eq!(
            lines[1..],
            [
                "restore_command = '/usr/bin/pgkeep --stanza it''s archive-get %f \"%p\"'",
                "recovery_target_xid = '42'",
                "recovery_target_inclusive = false",
                "recovery_target_action = 'pause'",
                "recovery_target_timeline = 'current'",
            ]
        );
        let end = recovery_settings(&BackupLabel("L".into()), &RestoreOptions::default());
        assert_eq!(end.len(), 2, "no target, no action: {end:?}");
    }

    #[test]
    fn a_standby_gets_its_primary_and_no_target() {
        let opts = RestoreOptions {
            standby: true,
            primary_conninfo: Some("host=db1 user='rep'".into()),
            target: Some(Target::Immediate),
            restore_command: "pgkeep archive-get %f \"%p\"".into(),
            ..Default::default()
        };
        let lines = recovery_settings(&BackupLabel("L".into()), &opts);
        assert_eq!(lines[1..], ["restore_command = 'pgkeep archive-get %f \"%p\"'", "primary_conninfo = 'host=db1 user=''rep'''"]);
    }

    #[test]
    fn refuses_non_empty_directories_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_destination(&dir.path().join("new"), false, "", crate::Hint::retry(crate::Opt::Force)).is_ok());
        assert!(check_destination(dir.path(), false, "", crate::Hint::retry(crate::Opt::Force)).is_ok());
        std::fs::write(dir.path().join("PG_VERSION"), "15").unwrap();
        assert!(check_destination(dir.path(), false, "", crate::Hint::retry(crate::Opt::Force))
            .is_err_and(|e| matches!(e.kind(), Error::Refused(_))));
        assert!(check_destination(dir.path(), true, "", crate::Hint::retry(crate::Opt::Force)).is_ok());
        std::fs::write(dir.path().join("postmaster.pid"), format!("{}\n", std::process::id())).unwrap();
        let e = check_destination(dir.path(), true, "", crate::Hint::retry(crate::Opt::Force)).unwrap_err().to_string();
        assert!(e.contains("is running"), "{e}");
    }
}
