//! Blocking `Read`/`Write` adapters over streaming object reads and
//! multipart writes, for the CPU-bound pipelines (checksum, compression)
//! that run on blocking worker threads. Memory per adapter is bounded: the
//! writer buffers at most one part (plus the parts in flight), the reader
//! one chunk of the response body.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as KeyPath;
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;

/// Size of the buffer before a multipart upload starts, and of each part.
const PART_SIZE: usize = 8 << 20;

/// Writes one object from a blocking thread. Call [`ObjectWriter::finish`];
/// dropping it unfinished leaves no object behind (the upload is aborted).
pub struct ObjectWriter {
    inner: Option<BufWriter>,
    rt: Handle,
    written: u64,
}

impl ObjectWriter {
    /// Starts writing `key` of `store`; `rt` is the runtime to drive I/O on.
    pub fn new(store: Arc<dyn ObjectStore>, key: &str, rt: Handle) -> Self {
        let w = BufWriter::with_capacity(store, KeyPath::from(key), PART_SIZE).with_max_concurrency(2);
        ObjectWriter { inner: Some(w), rt, written: 0 }
    }

    /// Completes the object; returns the bytes written.
    pub fn finish(mut self) -> io::Result<u64> {
        let mut w = self.inner.take().expect("finished once");
        self.rt.block_on(w.shutdown())?;
        Ok(self.written)
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let w = self.inner.as_mut().expect("not finished");
        self.rt.block_on(w.write_all(buf))?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(mut w) = self.inner.take() {
            let _ = self.rt.block_on(w.abort());
        }
    }
}

/// Reads one object from a blocking thread. A local repository hands over
/// the file itself, read directly; other stores stream the response body.
pub struct ObjectReader {
    source: Source,
    rt: Handle,
    /// Bytes read so far.
    pub read: u64,
}

enum Source {
    File(std::io::Take<std::fs::File>),
    Stream { stream: BoxStream<'static, object_store::Result<Bytes>>, chunk: Bytes },
    Steps { store: Arc<dyn ObjectStore>, key: KeyPath, at: u64, end: u64, chunk: Bytes },
}

/// How much of an object [`ObjectReader::in_steps`] fetches at a time.
const STEP: u64 = 4 << 20;

impl ObjectReader {
    /// Opens `key` of `store`, or only `range` of it.
    pub fn open(store: Arc<dyn ObjectStore>, key: &str, range: Option<std::ops::Range<u64>>, rt: Handle) -> object_store::Result<Self> {
        // An empty range (an empty file bundled uncompressed) reads
        // nothing; stores refuse to serve one.
        if range.as_ref().is_some_and(|r| r.is_empty()) {
            let empty = Box::pin(futures::stream::empty()) as BoxStream<'static, object_store::Result<Bytes>>;
            return Ok(ObjectReader { source: Source::Stream { stream: empty, chunk: Bytes::new() }, rt, read: 0 });
        }
        let key = KeyPath::from(key);
        let opts = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        let got = rt.block_on(async move { store.get_opts(&key, opts).await })?;
        let source = match got.payload {
            GetResultPayload::File(mut file, _) => {
                use std::io::{Seek, SeekFrom};
                file.seek(SeekFrom::Start(got.range.start))
                    .map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
                Source::File(file.take(got.range.end - got.range.start))
            }
            GetResultPayload::Stream(stream) => Source::Stream { stream, chunk: Bytes::new() },
        };
        Ok(ObjectReader { source, rt, read: 0 })
    }
}

impl ObjectReader {
    /// Opens `key` of `store` to be read slowly, a step of [`STEP`] bytes
    /// at a time, each fetched whole: a reader that waits on other work
    /// between reads (a file list read along a backup's copy) holds no
    /// response open, which a server or the store's timeout would end.
    pub fn in_steps(store: Arc<dyn ObjectStore>, key: &str, rt: Handle) -> object_store::Result<Self> {
        let key = KeyPath::from(key);
        let end = rt.block_on(store.head(&key))?.size;
        Ok(ObjectReader { source: Source::Steps { store, key, at: 0, end, chunk: Bytes::new() }, rt, read: 0 })
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &mut self.source {
            Source::File(f) => f.read(buf)?,
            Source::Stream { stream, chunk } => {
                while chunk.is_empty() {
                    match self.rt.block_on(stream.next()) {
                        Some(Ok(b)) => *chunk = b,
                        Some(Err(e)) => return Err(io::Error::other(e)),
                        None => return Ok(0),
                    }
                }
                let n = buf.len().min(chunk.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                chunk.advance(n);
                n
            }
            Source::Steps { store, key, at, end, chunk } => {
                while chunk.is_empty() {
                    if *at >= *end {
                        return Ok(0);
                    }
                    let to = (*at + STEP).min(*end);
                    *chunk = self.rt.block_on(store.get_range(key, *at..to)).map_err(io::Error::other)?;
                    if chunk.is_empty() {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the object ended before its size"));
                    }
                    *at += chunk.len() as u64;
                }
                let n = buf.len().min(chunk.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                chunk.advance(n);
                n
            }
        };
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object read in steps reads back whole, over several steps and
    /// when empty; one cut short under the reader is an error, not an end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_object_read_in_steps_reads_back_whole() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let big: Vec<u8> = (0..(2 * STEP + 12345)).map(|i| (i % 251) as u8).collect();
        for (key, bytes) in [("big", big.clone()), ("empty", Vec::new())] {
            store.put(&KeyPath::from(key), bytes.clone().into()).await.unwrap();
            let (store, key) = (store.clone(), key.to_owned());
            let read = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                ObjectReader::in_steps(store, &key, Handle::current()).unwrap().read_to_end(&mut out).map(|_| out)
            })
            .await
            .unwrap()
            .unwrap();
            assert!(read == bytes, "{} bytes read of {}", read.len(), bytes.len());
        }
        let reader = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || ObjectReader::in_steps(store, "big", Handle::current()).unwrap()).await.unwrap()
        };
        store.put(&KeyPath::from("big"), big[..100].to_vec().into()).await.unwrap();
        let e = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let mut out = Vec::new();
            reader.read_to_end(&mut out)
        })
        .await
        .unwrap();
        assert!(e.is_err(), "an object shorter than when opened");
    }
}
