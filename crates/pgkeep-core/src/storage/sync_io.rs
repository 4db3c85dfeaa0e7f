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
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStore};
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
}

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
        };
        self.read += n as u64;
        Ok(n)
    }
}
