//! A backup's file list, an object of its own from repository format 3:
//! `backup/<label>/files.jsonl<ext>`, one JSON object per line (a file
//! entry, as format 2's manifests held them in `files`), in [`path_order`],
//! compressed as the backup's files and encrypted as every object. It is
//! written as the files are stored and read back as a stream, so that no
//! process needs a whole list in memory; the manifest records its key,
//! its number of entries and the BLAKE3 of its lines, which a reader checks
//! at the end.

use std::cmp::Ordering;
use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::codec::{Compress, Encoder};
use crate::crypto::{unsealing, Sealing};
use crate::error::{Error, Result};
use crate::storage::{ObjectReader, ObjectWriter};
use crate::types::BackupLabel;

use super::{FileEntry, Repository};

/// The order of paths in a file list, and of a backup's walk of the data
/// directory: component by component (`base/1/2` before `base/1.x`,
/// which plain byte order puts first), so that a directory's files follow
/// it whatever the characters of their names; but `global/pg_control`
/// last, as a backup copies it (lists written before this rule, with it in
/// its place, are read back in this order too: see [`ListReader`]).
pub fn path_order(a: &str, b: &str) -> Ordering {
    let control = |p: &str| p == crate::pg::CONTROL_FILE;
    control(a).cmp(&control(b)).then_with(|| a.split('/').cmp(b.split('/')))
}

/// Reads `list` (entries in [`path_order`]) up to `path`: the entries
/// before it are passed over, and the entry of `path`, if the list has
/// one, is taken out. Each call must ask for a path after the one before:
/// this is how a list is merged with a walk, or with another list, in one
/// pass.
pub fn entry_at<I: Iterator<Item = Result<FileEntry>>>(list: &mut std::iter::Peekable<I>, path: &str) -> Result<Option<FileEntry>> {
    loop {
        let order = match list.peek() {
            None => return Ok(None),
            Some(Ok(e)) => path_order(&e.path, path),
            Some(Err(_)) => return Err(list.next().and_then(Result::err).expect("peeked an error")),
        };
        match order {
            Ordering::Less => drop(list.next()),
            Ordering::Equal => return list.next().transpose(),
            Ordering::Greater => return Ok(None),
        }
    }
}

/// What a manifest records of its file list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileList {
    /// Its key, relative to the stanza.
    pub key: String,
    /// Entries in it.
    pub count: u64,
    /// BLAKE3 of its lines, uncompressed.
    pub checksum: String,
}

/// Writes a file list, one entry at a time, in [`path_order`].
pub struct ListWriter {
    enc: Encoder<'static, Sealing<ObjectWriter>>,
    hasher: blake3::Hasher,
    count: u64,
    last: Option<String>,
    key: String,
    line: Vec<u8>,
}

impl ListWriter {
    /// Starts the list of backup `label` in `repo` (call from a blocking
    /// thread of the runtime).
    pub fn create(repo: &Repository, label: &BackupLabel, compress: Compress) -> Result<ListWriter> {
        let key = super::keys::file_list(label, compress.extension());
        let what = |e| Error::Io { what: format!("cannot store the file list '{key}'"), cause: e };
        let writer = Sealing::new(repo.cipher.as_ref(), ObjectWriter::new(repo.store().object_store(), &key, Handle::current()))?;
        let enc = compress.encoder(writer, None).map_err(what)?;
        Ok(ListWriter { enc, hasher: blake3::Hasher::new(), count: 0, last: None, key, line: Vec::new() })
    }

    /// Appends an entry; its path must come after the last one's.
    pub fn push(&mut self, e: &FileEntry) -> Result<()> {
        if let Some(last) = &self.last {
            if path_order(last, &e.path) != Ordering::Less {
                return Err(Error::Input(format!(
                    "file list '{}': {} comes after {last}; this is a bug in pgkeep, please report it",
                    self.key, e.path
                )));
            }
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, e).expect("a file entry serialises");
        self.line.push(b'\n');
        self.hasher.update(&self.line);
        self.enc.write_all(&self.line).map_err(|e| Error::Io { what: format!("cannot store the file list '{}'", self.key), cause: e })?;
        self.count += 1;
        match &mut self.last {
            Some(last) => {
                last.clear();
                last.push_str(&e.path);
            }
            None => self.last = Some(e.path.clone()),
        }
        Ok(())
    }

    /// Completes the object; returns what the manifest records of it.
    pub fn finish(self) -> Result<FileList> {
        let key = self.key;
        let what = |e| Error::Io { what: format!("cannot store the file list '{key}'"), cause: e };
        let object = self.enc.finish().and_then(Sealing::finish).map_err(what)?;
        object.finish().map_err(what)?;
        Ok(FileList { key: key.clone(), count: self.count, checksum: self.hasher.finalize().to_hex().to_string() })
    }
}

/// Reads a file list back, entry by entry (call from a blocking thread),
/// in [`path_order`]: an entry of `global/pg_control` met before the end
/// (lists written before it came last) is held back and given last.
/// After the last entry, checks the count and checksum the manifest
/// recorded: an error then is the last item.
pub struct ListReader {
    lines: BufReader<Box<dyn Read + Send>>,
    hasher: blake3::Hasher,
    count: u64,
    expect: FileList,
    what: String,
    buf: String,
    done: bool,
    control: Option<FileEntry>,
}

impl ListReader {
    /// Opens `list` (compressed with `compress`) in `repo` (call from a
    /// blocking thread of the runtime); `what` names the backup in errors.
    pub fn open(repo: &Repository, list: &FileList, compress: Compress, what: &str) -> Result<ListReader> {
        let what = format!("the file list '{}' of {what}", list.key);
        // Read in steps: the list is read along other work (a backup's
        // copy, a restore's), which can leave it idle for long.
        let reader = ObjectReader::in_steps(repo.store().object_store(), &list.key, Handle::current())
            .map_err(Error::storage(format!("cannot read {what}")))?;
        let corrupt = |e: std::io::Error| Error::Corrupt(format!("{what} cannot be read ({e}): it is corrupt; restore another backup"));
        let plain = compress.decoder(unsealing(repo.cipher.as_ref(), reader).map_err(corrupt)?).map_err(corrupt)?;
        Ok(ListReader {
            lines: BufReader::with_capacity(256 << 10, plain),
            hasher: blake3::Hasher::new(),
            count: 0,
            expect: list.clone(),
            what,
            buf: String::new(),
            done: false,
            control: None,
        })
    }

    fn corrupt(&mut self, why: String) -> Option<Result<FileEntry>> {
        self.done = true;
        Some(Err(Error::Corrupt(format!("{} {why}: it is corrupt or truncated; restore another backup", self.what))))
    }
}

impl Iterator for ListReader {
    type Item = Result<FileEntry>;

    fn next(&mut self) -> Option<Result<FileEntry>> {
        match self.line() {
            Some(Ok(e)) if e.path == crate::pg::CONTROL_FILE && self.control.is_none() => {
                self.control = Some(e);
                self.next()
            }
            None => self.control.take().map(Ok),
            other => other,
        }
    }
}

impl ListReader {
    /// The next entry as the object holds it.
    fn line(&mut self) -> Option<Result<FileEntry>> {
        if self.done {
            return None;
        }
        self.buf.clear();
        match self.lines.read_line(&mut self.buf) {
            Ok(0) => {
                self.done = true;
                if self.count != self.expect.count {
                    let (count, expect) = (self.count, self.expect.count);
                    return self.corrupt(format!("holds {count} entries instead of {expect}"));
                }
                if std::mem::replace(&mut self.hasher, blake3::Hasher::new()).finalize().to_hex().as_str() != self.expect.checksum {
                    return self.corrupt("fails its checksum".into());
                }
                None
            }
            Ok(_) => {
                self.hasher.update(self.buf.as_bytes());
                self.count += 1;
                match serde_json::from_str(&self.buf) {
                    Ok(e) => Some(Ok(e)),
                    Err(e) => self.corrupt(format!("has a damaged entry ({e})")),
                }
            }
            Err(e) => match e.get_ref().is_some_and(|i| i.is::<object_store::Error>()) {
                true => {
                    self.done = true;
                    Some(Err(Error::Io { what: format!("cannot read {}", self.what), cause: e }))
                }
                false => self.corrupt(format!("cannot be decompressed ({e})")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_order_is_component_by_component() {
        let mut paths = vec![
            "base/1.x",
            "base/1/2",
            "global/pg_control",
            "base",
            "base/10/1",
            "base/1/10",
            "base/1/2_fsm",
            "a-b",
            "a/b",
            "pg_xact/0000",
        ];
        paths.sort_by(|a, b| path_order(a, b));
        assert_eq!(
            paths,
            ["a/b", "a-b", "base", "base/1/10", "base/1/2", "base/1/2_fsm", "base/1.x", "base/10/1", "pg_xact/0000", "global/pg_control"]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_list_reads_back_as_written_and_every_damage_is_an_error() {
        let store = crate::storage::Store::from_object_store(std::sync::Arc::new(object_store::memory::InMemory::new()), "memory://");
        let meta = super::super::StanzaMeta::for_test(7);
        let (plain, _) = Repository::create(&store, meta.clone(), 1, None).await.unwrap();
        let sealed_store =
            crate::storage::Store::from_object_store(std::sync::Arc::new(object_store::memory::InMemory::new()), "memory://");
        let (sealed, _) = Repository::create(&sealed_store, meta, 1, Some(b"secret")).await.unwrap();
        assert!(sealed.cipher.is_some());
        let label = BackupLabel("20261202-000000F".into());
        let entries: Vec<FileEntry> = (0..3000).map(|i| FileEntry::for_test(&format!("base/{}/{}", i / 1000, i % 1000), i, 0)).collect();
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| path_order(&a.path, &b.path));
        for (compress, repo) in [(Compress::Zstd, &plain), (Compress::Lz4, &sealed), (Compress::None, &plain)] {
            let (r, l, sorted2) = (repo.clone(), label.clone(), sorted.clone());
            let list = tokio::task::spawn_blocking(move || {
                let mut w = ListWriter::create(&r, &l, compress).unwrap();
                sorted2.iter().try_for_each(|e| w.push(e)).unwrap();
                let out_of_order = w.push(&sorted2[0]).unwrap_err().to_string();
                assert!(out_of_order.contains("bug in pgkeep"), "{out_of_order}");
                w.finish().unwrap()
            })
            .await
            .unwrap();
            assert_eq!(list.count, 3000);
            let read = |list: FileList| {
                let r = repo.clone();
                tokio::task::spawn_blocking(move || {
                    ListReader::open(&r, &list, compress, "backup X").and_then(|reader| reader.collect::<Result<Vec<_>>>())
                })
            };
            assert!(read(list.clone()).await.unwrap().unwrap() == sorted, "{compress:?}");
            let e = read(FileList { count: 2999, ..list.clone() }).await.unwrap().unwrap_err().to_string();
            assert!(e.contains("holds 3000 entries instead of 2999"), "{e}");
            let e = read(FileList { checksum: "0".repeat(64), ..list.clone() }).await.unwrap().unwrap_err().to_string();
            assert!(e.contains("fails its checksum"), "{e}");
            // Truncated, as an upload cut short would leave it.
            let bytes = repo.store().get(&list.key).await.unwrap().unwrap();
            repo.store().put(&list.key, bytes.slice(..bytes.len() * 2 / 3), false).await.unwrap();
            let e = read(list.clone()).await.unwrap().unwrap_err().to_string();
            assert!(e.contains("corrupt") && e.contains(&list.key), "{compress:?}: {e}");
        }
    }

    /// A list written before `global/pg_control` came last holds it in
    /// its place; it is read back last all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_control_file_listed_in_its_place_is_read_last() {
        let store = crate::storage::Store::from_object_store(std::sync::Arc::new(object_store::memory::InMemory::new()), "memory://");
        let (repo, _) = Repository::create(&store, super::super::StanzaMeta::for_test(7), 1, None).await.unwrap();
        let paths = ["base/1/2", "global/1262", "global/pg_control", "global/pg_filenode.map", "pg_xact/0000"];
        let lines: String = paths.iter().map(|p| format!("{}\n", serde_json::to_string(&FileEntry::for_test(p, 1, 0)).unwrap())).collect();
        let key = "backup/L/files.jsonl".to_owned();
        repo.store().put(&key, bytes::Bytes::from(lines.clone()), false).await.unwrap();
        let list = FileList { key, count: 5, checksum: blake3::hash(lines.as_bytes()).to_hex().to_string() };
        let r = repo.clone();
        let read: Vec<String> = tokio::task::spawn_blocking(move || {
            ListReader::open(&r, &list, Compress::None, "backup L").unwrap().map(|e| e.unwrap().path).collect()
        })
        .await
        .unwrap();
        assert_eq!(read, ["base/1/2", "global/1262", "global/pg_filenode.map", "pg_xact/0000", "global/pg_control"]);
    }
}
