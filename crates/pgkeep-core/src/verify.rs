//! `verify`: re-reads what a repository stores and checks it, without
//! trusting anything it has not just read:
//!
//! - every manifest (envelope checksum, decryption);
//! - every stored piece of every file of the chosen backups (decrypted,
//!   decompressed, hashed against the manifest, sizes checked), and that
//!   the backups each one builds on are there;
//! - every archived WAL file (its content against the hash in its name);
//! - that the archive is continuous, per timeline, from the oldest backup's
//!   start on that timeline (or the timeline's first segment) to its last
//!   segment; gaps are reported with their range.
//!
//! Problems are collected, not raised: one run reports all of them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{FileEntry, Manifest, Repository};
use crate::restore::{read_piece, read_stored, Scratch, Source};
use crate::types::{BackupLabel, TimelineId, WalSegment};
use crate::workers::Workers;
use crate::Stanza;

/// Options of `verify`.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Repository (1-based; 0 means 1).
    pub repo: usize,
    /// Only this backup (and, always, the archive it needs).
    pub set: Option<BackupLabel>,
    /// Where to count progress.
    pub progress: Option<Arc<Progress>>,
}

/// One backup's result.
#[derive(Debug, Clone)]
pub struct BackupCheck {
    /// Its label.
    pub label: BackupLabel,
    /// Files checked.
    pub files: usize,
    /// Stored bytes read.
    pub bytes: u64,
    /// What is wrong, one line each.
    pub problems: Vec<String>,
}

/// A run of missing segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Gap {
    /// Timeline.
    pub timeline: TimelineId,
    /// First missing segment.
    pub from: String,
    /// Last missing segment.
    pub to: String,
}

/// What `verify` found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Repository.
    pub repo: usize,
    /// Backups checked.
    pub backups: Vec<BackupCheck>,
    /// Archived WAL files checked.
    pub wal_files: usize,
    /// Problems with archived WAL files, one line each.
    pub wal_problems: Vec<String>,
    /// Holes in the archive.
    pub gaps: Vec<Gap>,
    /// Damaged stanza lock objects, one line each.
    pub lock_problems: Vec<String>,
}

impl VerifyReport {
    /// Problems found, in all.
    pub fn problems(&self) -> usize {
        self.backups.iter().map(|b| b.problems.len()).sum::<usize>() + self.wal_problems.len() + self.gaps.len() + self.lock_problems.len()
    }
}

/// As JSON: `repo`, `ok`, `backups` (`label`, `files`, `repo-bytes`,
/// `problems`), `wal` (`files`, `problems`, `gaps`: `timeline`, `from`,
/// `to`), `lock-problems`.
impl serde::Serialize for VerifyReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Backup<'a> {
            label: &'a BackupLabel,
            files: usize,
            repo_bytes: u64,
            problems: &'a [String],
        }
        #[derive(serde::Serialize)]
        struct GapOut<'a> {
            timeline: u32,
            from: &'a str,
            to: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Wal<'a> {
            files: usize,
            problems: &'a [String],
            gaps: Vec<GapOut<'a>>,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Out<'a> {
            repo: usize,
            ok: bool,
            backups: Vec<Backup<'a>>,
            wal: Wal<'a>,
            lock_problems: &'a [String],
        }
        Out {
            repo: self.repo,
            ok: self.problems() == 0,
            backups: self
                .backups
                .iter()
                .map(|b| Backup { label: &b.label, files: b.files, repo_bytes: b.bytes, problems: &b.problems })
                .collect(),
            wal: Wal {
                files: self.wal_files,
                problems: &self.wal_problems,
                gaps: self.gaps.iter().map(|g| GapOut { timeline: g.timeline.0, from: &g.from, to: &g.to }).collect(),
            },
            lock_problems: &self.lock_problems,
        }
        .serialize(s)
    }
}

/// Verifies one repository.
pub async fn run(stanza: &Stanza, opts: &VerifyOptions) -> Result<VerifyReport> {
    let number = opts.repo.max(1);
    let repo = stanza.open(number).await?;
    let jobs = stanza.settings.jobs;
    let progress = opts.progress.clone().unwrap_or_default();
    progress.step(crate::progress::Step::Reading);

    // Manifests, one by one, so that a damaged one is a finding.
    let mut labels: Vec<BackupLabel> = repo.store().list_dirs(crate::repo::keys::BACKUP_DIR).await?.into_iter().map(BackupLabel).collect();
    labels.sort();
    let mut manifests = Vec::new();
    let mut backups = Vec::new();
    for label in labels {
        match repo.manifest(&label).await {
            Ok(Some(m)) => manifests.push(m),
            Ok(None) => {} // unfinished: not a backup
            Err(e) => backups.push(BackupCheck { label, files: 0, bytes: 0, problems: vec![crate::error::OneLine(&e).to_string()] }),
        }
    }
    if let Some(set) = &opts.set {
        if !manifests.iter().any(|m| &m.label == set) && !backups.iter().any(|b| &b.label == set) {
            return Err(Error::NotFound(format!("backup {set} does not exist in repo {number}"))
                .with_hint(crate::Hint::run(crate::Operation::Info)));
        }
        backups.retain(|b| &b.label == set);
    }
    let chosen: Vec<&Manifest> = manifests.iter().filter(|m| opts.set.as_ref().is_none_or(|s| &m.label == s)).collect();
    progress.plan(chosen.iter().map(|m| m.file_count()).sum(), chosen.iter().map(|m| m.repo_size).sum());
    for m in chosen {
        backups.push(check_backup(&repo, m, &manifests, jobs, &progress).await);
    }
    // verify takes no lock: a backup an expire removed meanwhile is gone,
    // not damaged.
    let mut gone = Vec::new();
    for b in backups.iter().filter(|b| !b.problems.is_empty()) {
        if matches!(repo.manifest(&b.label).await, Ok(None)) {
            gone.push(b.label.clone());
        }
    }
    backups.retain(|b| !gone.contains(&b.label));
    manifests.retain(|m| !gone.contains(&m.label));
    backups.sort_by(|a, b| a.label.cmp(&b.label));

    // Each system of the stanza's history has its own archive, checked
    // against its own backups.
    let (mut wal_files, mut wal_problems, mut all_gaps) = (0, Vec::new(), Vec::new());
    for system in repo.meta.systems() {
        let archive = repo.for_system(system.system_id, "the stanza's history")?;
        let (files, problems) = check_wal_objects(&archive, jobs).await?;
        wal_files += files;
        wal_problems.extend(problems);
        let seg = system.wal_segment_size;
        let segments: Vec<WalSegment> = archive.list_segments().await?.into_iter().map(|(s, _)| s).collect();
        let starts: Vec<WalSegment> =
            manifests.iter().filter(|m| m.system_id == system.system_id).filter_map(|m| WalSegment::parse(&m.start_wal, seg)).collect();
        all_gaps.extend(gaps(&segments, &starts, seg));
    }
    let gaps = all_gaps;
    let lock_problems = crate::repo::lock::damaged(&repo).await?;
    Ok(VerifyReport { repo: number, backups, wal_files, wal_problems, gaps, lock_problems })
}

/// Reads every stored piece of `m`'s files; checks its chain.
async fn check_backup(repo: &Repository, m: &Manifest, all: &[Manifest], jobs: usize, progress: &Arc<Progress>) -> BackupCheck {
    let mut problems = Vec::new();
    let mut at = m;
    while let Some(prior) = &at.prior {
        match all.iter().find(|p| &p.label == prior) {
            Some(p) => at = p,
            None => {
                problems.push(format!("backup {} builds on backup {prior}, which is missing: it cannot be restored", m.label));
                break;
            }
        }
    }
    let source = Source::new(repo);
    let (compress, progress, label) = (m.compress, progress.clone(), m.label.clone());
    let opened = {
        let (repo, m) = (repo.clone(), m.clone());
        tokio::task::spawn_blocking(move || repo.file_reader(&m)).await.map_err(Error::task("a verify worker")).and_then(|r| r)
    };
    let list = match opened {
        Ok(list) => std::sync::Mutex::new(list.peekable()),
        Err(e) => {
            problems.push(format!("backup {}: {}", m.label, crate::error::OneLine(&e)));
            return BackupCheck { label: m.label.clone(), files: m.file_count() as usize, bytes: 0, problems };
        }
    };
    // The list is read as the workers go, in runs of files bundled
    // together, each run's bytes read in one request; an entry the list
    // cannot give (a damaged list) is a problem of its own.
    let next = move || next_run(&mut *list.lock().ok()?);
    let mut workers = Workers::fed("a verify worker", jobs, next, move |scratch: &mut Scratch, run: &Vec<Result<FileEntry>>| {
        let (mut bytes, mut problems) = (0, Vec::new());
        let span = bundled_span(run);
        let fetched = span.as_ref().map(|(key, range)| (range.start, source.read_range(key, range.clone())));
        for f in run {
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!("backup {label}: {}", crate::error::OneLine(e)));
                    continue;
                }
            };
            let mut file_bytes = 0;
            for piece in f.pieces() {
                file_bytes += piece.repo_size;
                // A range the read did not give whole (a truncated bundle)
                // is read on its own, to be reported on its own.
                let slice = match (&fetched, &piece.range) {
                    (Some((start, Ok(all))), Some(r)) => {
                        let (from, to) = ((r.start - start) as usize, (r.end - start) as usize);
                        all.get(from..to)
                    }
                    _ => None,
                };
                let read = match slice {
                    Some(slice) => read_stored(&source, slice, &piece, compress, &f.path, scratch, |_, _| Ok(())),
                    None => read_piece(&source, &piece, compress, &f.path, scratch, |_, _| Ok(())),
                };
                if let Err(e) = read {
                    problems.push(format!("backup {label}: {}: {}", f.path, crate::error::OneLine(&e)));
                    break;
                }
            }
            bytes += file_bytes;
            progress.add_bytes(file_bytes);
            progress.file_done();
        }
        Ok((bytes, problems))
    });
    let mut bytes = 0;
    while let Some(done) = workers.next().await {
        match done {
            Ok((b, found)) => {
                bytes += b;
                problems.extend(found);
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if let Err(e) = workers.finish().await {
        problems.push(e.to_string());
    }
    BackupCheck { label: m.label.clone(), files: m.file_count() as usize, bytes, problems }
}

/// Files bundled together read in one request, at most.
const RUN: usize = 1024;

/// The next entries of a list to check together: one entry, or up to
/// [`RUN`] consecutive entries bundled in the same bundle.
fn next_run(list: &mut std::iter::Peekable<impl Iterator<Item = Result<FileEntry>>>) -> Option<Vec<Result<FileEntry>>> {
    let first = list.next()?;
    let bundle = first.as_ref().ok().and_then(bundled).map(str::to_owned);
    let mut run = vec![first];
    if let Some(bundle) = bundle {
        while run.len() < RUN && list.peek().is_some_and(|f| f.as_ref().ok().and_then(bundled) == Some(bundle.as_str())) {
            run.extend(list.next());
        }
    }
    Some(run)
}

/// The bundle `f` is stored in, if it is bundled.
fn bundled(f: &FileEntry) -> Option<&str> {
    f.offset.and(f.key.as_deref())
}

/// For a run of two or more bundled files: their bundle and the range of
/// it that holds them all (a bundle is at most a few MiB).
fn bundled_span(run: &[Result<FileEntry>]) -> Option<(String, std::ops::Range<u64>)> {
    let files: Vec<&FileEntry> = run.iter().filter_map(|f| f.as_ref().ok()).collect();
    let key = bundled(files.first()?)?;
    let start = files.iter().filter_map(|f| f.offset).min()?;
    let end = files.iter().filter_map(|f| f.offset?.checked_add(f.repo_size)).max()?;
    (files.len() > 1 && end > start).then(|| (key.to_owned(), start..end))
}

/// Reads every archived WAL file back and checks it against its name's
/// hash; returns (files, problems).
async fn check_wal_objects(repo: &Repository, jobs: usize) -> Result<(usize, Vec<String>)> {
    let wal = repo.list_wal().await?;
    let count = wal.len();
    let failed: Vec<(String, String)> = futures::stream::iter(wal)
        .map(|w| async move { repo.read_wal(&w).await.err().map(|e| (w.key.clone(), crate::error::OneLine(&e).to_string())) })
        .buffer_unordered(jobs)
        .filter_map(|p| async move { p })
        .collect()
        .await;
    // WAL an expire removed meanwhile is gone, not damaged.
    let still: Vec<String> = if failed.is_empty() { Vec::new() } else { repo.list_wal().await?.into_iter().map(|w| w.key).collect() };
    let problems = failed.into_iter().filter(|(key, _)| still.contains(key)).map(|(_, p)| p).collect();
    Ok((count, problems))
}

/// The runs of segments missing from `have`, per timeline: from the oldest
/// backup start on that timeline (else the timeline's first archived
/// segment) to its last archived segment (pure).
pub fn gaps(have: &[WalSegment], backup_starts: &[WalSegment], seg_size: u64) -> Vec<Gap> {
    let mut by_tli: BTreeMap<TimelineId, Vec<u64>> = BTreeMap::new();
    for s in have {
        by_tli.entry(s.timeline).or_default().push(s.number);
    }
    let mut oldest: HashMap<TimelineId, u64> = HashMap::new();
    for s in backup_starts {
        let e = oldest.entry(s.timeline).or_insert(s.number);
        *e = (*e).min(s.number);
    }
    let mut out = Vec::new();
    for (tli, mut numbers) in by_tli {
        numbers.sort_unstable();
        numbers.dedup();
        let last = *numbers.last().expect("a timeline listed has segments");
        let first = oldest.get(&tli).copied().unwrap_or(numbers[0]);
        let mut expect = first;
        for n in numbers.into_iter().filter(|n| *n >= first).chain(std::iter::once(last + 1)) {
            if n > expect && expect <= last {
                let name = |number| WalSegment { timeline: tli, number }.name(seg_size);
                out.push(Gap { timeline: tli, from: name(expect), to: name(n - 1) });
            }
            expect = expect.max(n + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn segs(tli: u32, numbers: &[u64]) -> Vec<WalSegment> {
        numbers.iter().map(|&number| WalSegment { timeline: TimelineId(tli), number }).collect()
    }

    /// Consecutive files of one bundle are checked together, with one read
    /// of the range that holds them; anything else alone.
    #[test]
    fn runs_group_consecutive_files_of_one_bundle() {
        let bundled = |path: &str, key: &str, offset: u64| FileEntry {
            key: Some(key.into()),
            offset: Some(offset),
            repo_size: 10,
            ..FileEntry::for_test(path, 100, 0)
        };
        let own = |path: &str| FileEntry { key: Some(format!("k/{path}")), repo_size: 10, ..FileEntry::for_test(path, 100, 0) };
        let list: Vec<Result<FileEntry>> = vec![
            Ok(bundled("a", "b/1", 0)),
            Ok(bundled("b", "b/1", 30)),
            Ok(bundled("c", "b/1", 10)),
            Ok(own("d")),
            Ok(bundled("e", "b/1", 50)),
            Ok(bundled("f", "b/2", 0)),
            Err(Error::Corrupt("damaged list".into())),
            Ok(bundled("g", "b/2", 10)),
        ];
        let mut list = list.into_iter().peekable();
        let mut runs = Vec::new();
        while let Some(run) = next_run(&mut list) {
            let paths: Vec<String> = run.iter().map(|f| f.as_ref().map_or("!".into(), |f| f.path.clone())).collect();
            runs.push((paths.join(","), bundled_span(&run)));
        }
        let expect = |paths: &str, span: Option<(&str, std::ops::Range<u64>)>| (paths.to_owned(), span.map(|(k, r)| (k.to_owned(), r)));
        assert_eq!(
            runs,
            [
                expect("a,b,c", Some(("b/1", 0..40))),
                expect("d", None),
                expect("e", None),
                expect("f", None),
                expect("!", None),
                expect("g", None),
            ]
        );
    }

    #[test]
    fn gaps_are_reported_per_timeline_from_the_oldest_backup_on() {
        let mut have = segs(1, &[3, 4, 5, 8, 9, 12]);
        have.extend(segs(2, &[9, 10, 11]));
        let gaps = gaps(&have, &segs(1, &[4]), SEG);
        let shape: Vec<(u32, String, String)> = gaps.iter().map(|g| (g.timeline.0, g.from.clone(), g.to.clone())).collect();
        assert_eq!(
            shape,
            vec![
                (1, "000000010000000000000006".into(), "000000010000000000000007".into()),
                (1, "00000001000000000000000A".into(), "00000001000000000000000B".into()),
            ]
        );
        // WAL a backup needs before the first archived segment is a gap too.
        let gaps = super::gaps(&segs(1, &[5, 6]), &segs(1, &[3]), SEG);
        assert_eq!(gaps.len(), 1);
        assert_eq!((gaps[0].from.as_str(), gaps[0].to.as_str()), ("000000010000000000000003", "000000010000000000000004"));
        // Continuous: nothing.
        assert!(super::gaps(&segs(1, &[1, 2, 3]), &segs(1, &[1]), SEG).is_empty());
        assert!(super::gaps(&[], &[], SEG).is_empty());
    }
}
