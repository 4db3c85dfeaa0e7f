//! The files of a restore as a stream: the file list of the backup
//! restored, read along the lists of the backups it builds on (every list
//! in [`path_order`](crate::repo::filelist::path_order)), gives each file with the entries that rebuild it,
//! oldest (a whole copy) first. Nothing holds a whole list.

use std::iter::Peekable;

use crate::codec::Compress;
use crate::error::{Error, Result};
use crate::repo::filelist::entry_at;
use crate::repo::{FileEntry, Manifest, Repository};
use crate::types::BackupLabel;

/// A backup's entries, as [`Repository::file_reader`] gives them.
type Entries = Box<dyn Iterator<Item = Result<FileEntry>> + Send>;

/// A file of the backup restored and its layers: the entries of the same
/// path that rebuild it, oldest (a whole copy) first, each with its
/// backup's compression.
pub(super) struct Layered {
    pub(super) file: FileEntry,
    pub(super) layers: Vec<(FileEntry, Compress)>,
}

impl Layered {
    /// The layers, borrowed.
    pub(super) fn layer_refs(&self) -> Vec<(&FileEntry, Compress)> {
        self.layers.iter().map(|(e, c)| (e, *c)).collect()
    }
}

/// The files of `chain[0]` with their layers in `chain` (newest first).
pub(super) struct ChainFiles {
    labels: Vec<BackupLabel>,
    compress: Vec<Compress>,
    lists: Vec<Peekable<Entries>>,
    failed: bool,
}

impl ChainFiles {
    /// Opens the list of every backup of `chain` (call from a blocking
    /// thread of the runtime).
    pub(super) fn open(repo: &Repository, chain: &[Manifest]) -> Result<ChainFiles> {
        let lists = chain.iter().map(|m| repo.file_reader(m).map(Iterator::peekable)).collect::<Result<_>>()?;
        Ok(ChainFiles {
            labels: chain.iter().map(|m| m.label.clone()).collect(),
            compress: chain.iter().map(|m| m.compress).collect(),
            lists,
            failed: false,
        })
    }

    /// The same over lists given as they are, for tests.
    #[cfg(test)]
    pub(super) fn of(chain: Vec<(BackupLabel, Compress, Vec<FileEntry>)>) -> ChainFiles {
        let mut out = ChainFiles { labels: Vec::new(), compress: Vec::new(), lists: Vec::new(), failed: false };
        for (label, compress, files) in chain {
            out.labels.push(label);
            out.compress.push(compress);
            out.lists.push((Box::new(files.into_iter().map(Ok)) as Entries).peekable());
        }
        out
    }

    fn layered(&mut self, file: FileEntry) -> Result<Layered> {
        let mut layers = vec![(file.clone(), self.compress[0])];
        let mut delta = file.delta;
        for b in 1..self.lists.len() {
            if !delta {
                break;
            }
            let Some(e) = entry_at(&mut self.lists[b], &file.path)? else {
                return Err(Error::Corrupt(format!(
                    "backup {} holds {} as changes over backup {}, which does not have it; restore another backup",
                    self.labels[0], file.path, self.labels[b]
                )));
            };
            delta = e.delta;
            layers.push((e, self.compress[b]));
        }
        if delta {
            return Err(Error::Corrupt(format!(
                "backup {} holds {} as changes, but no backup of its chain holds the whole file",
                self.labels[0], file.path
            )));
        }
        layers.reverse();
        Ok(Layered { file, layers })
    }
}

/// Reads the lists of `chain` through, as a restore would: an error when
/// one is damaged or does not rebuild a file.
pub(super) async fn check(repo: &Repository, chain: &[Manifest]) -> Result<()> {
    let (repo, chain) = (repo.clone(), chain.to_vec());
    tokio::task::spawn_blocking(move || ChainFiles::open(&repo, &chain)?.try_for_each(|l| l.map(drop)))
        .await
        .map_err(Error::task("reading a backup's file lists"))?
}

impl Iterator for ChainFiles {
    type Item = Result<Layered>;

    fn next(&mut self) -> Option<Result<Layered>> {
        if self.failed {
            return None;
        }
        let next = self.lists[0].next()?.and_then(|f| self.layered(f));
        self.failed = next.is_err();
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_file_gets_its_layers_down_to_a_whole_copy() {
        let whole = |p: &str| FileEntry::for_test(p, 1, 0);
        let delta = |p: &str| FileEntry { delta: true, ..FileEntry::for_test(p, 1, 0) };
        let label = |l: &str| BackupLabel(l.into());
        let chain = || {
            ChainFiles::of(vec![
                (label("I2"), Compress::Lz4, vec![delta("base/1/1"), whole("base/1/2"), delta("base/1/3"), whole("global/pg_control")]),
                (label("I1"), Compress::Zstd, vec![whole("base/1/0"), delta("base/1/1"), delta("base/1/3"), whole("global/pg_control")]),
                (label("F"), Compress::None, vec![whole("base/1/1"), whole("base/1/2"), whole("base/1/3"), whole("global/pg_control")]),
            ])
        };
        let got: Vec<(String, Vec<(bool, Compress)>)> = chain()
            .map(|l| {
                let l = l.unwrap();
                (l.file.path.clone(), l.layers.iter().map(|(e, c)| (e.delta, *c)).collect())
            })
            .collect();
        assert_eq!(
            got,
            [
                ("base/1/1".to_owned(), vec![(false, Compress::None), (true, Compress::Zstd), (true, Compress::Lz4)]),
                ("base/1/2".to_owned(), vec![(false, Compress::Lz4)]),
                ("base/1/3".to_owned(), vec![(false, Compress::None), (true, Compress::Zstd), (true, Compress::Lz4)]),
                ("global/pg_control".to_owned(), vec![(false, Compress::Lz4)]),
            ]
        );

        // A delta over a backup without the file, or with no whole copy
        // below it, is an error that ends the stream.
        let broken = ChainFiles::of(vec![
            (label("I"), Compress::Zstd, vec![delta("base/1/1"), whole("base/1/2")]),
            (label("F"), Compress::Zstd, vec![whole("base/1/2")]),
        ]);
        let out: Vec<_> = broken.collect();
        assert_eq!(out.len(), 1);
        let e = out.into_iter().next().unwrap().err().unwrap().to_string();
        assert!(e.contains("over backup F, which does not have it"), "{e}");
        let baseless = ChainFiles::of(vec![(label("I"), Compress::Zstd, vec![delta("base/1/1")])]);
        let e = baseless.into_iter().next().unwrap().err().unwrap().to_string();
        assert!(e.contains("no backup of its chain holds the whole file"), "{e}");
    }
}
