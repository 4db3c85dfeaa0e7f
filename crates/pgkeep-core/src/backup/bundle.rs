//! Bundling: the stored form of every small file (compressed, encrypted)
//! is appended to a shared bundle object of up to 8 MiB instead of being
//! a PUT of its own, so a database of 100,000 small files does not cost
//! 100,000 requests. A file's manifest entry then names the bundle and its
//! `offset`; its `repo-size` is the length. Bundles are written before the
//! manifest, like every other object of the backup.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path as KeyPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Handle;

/// Files planned smaller than this are bundled.
pub const SMALL_FILE: u64 = 256 * 1024;
/// A bundle is uploaded once it holds this much.
const BUNDLE_SIZE: usize = 8 << 20;

/// Collects small stored objects into bundles under `dir`.
pub struct Bundler {
    store: Arc<dyn ObjectStore>,
    dir: String,
    rt: Handle,
    state: Mutex<(u64, Vec<u8>)>,
}

impl Bundler {
    /// Bundles go to `<dir>/<n>`.
    pub fn new(store: Arc<dyn ObjectStore>, dir: String, rt: Handle) -> Self {
        Bundler { store, dir, rt, state: Mutex::new((1, Vec::new())) }
    }

    /// Appends one stored object; returns the bundle's key and the offset
    /// in it. A bundle that is full is uploaded by the caller that filled it.
    pub fn append(&self, bytes: &[u8]) -> io::Result<(String, u64)> {
        let (key, offset, full) = {
            let mut state = self.state.lock().map_err(|_| io::Error::other("a bundling worker failed"))?;
            let (number, buf) = &mut *state;
            let key = format!("{}/{number}", self.dir);
            let offset = buf.len() as u64;
            buf.extend_from_slice(bytes);
            let full = (buf.len() >= BUNDLE_SIZE).then(|| std::mem::take(buf));
            if full.is_some() {
                *number += 1;
            }
            (key, offset, full)
        };
        if let Some(data) = full {
            self.upload(&key, data)?;
        }
        Ok((key, offset))
    }

    /// Uploads the last, partly filled bundle.
    pub fn finish(&self) -> io::Result<()> {
        let (key, data) = {
            let mut state = self.state.lock().map_err(|_| io::Error::other("a bundling worker failed"))?;
            let (number, buf) = &mut *state;
            (format!("{}/{number}", self.dir), std::mem::take(buf))
        };
        if data.is_empty() {
            return Ok(());
        }
        self.upload(&key, data)
    }

    fn upload(&self, key: &str, data: Vec<u8>) -> io::Result<()> {
        let (store, key) = (self.store.clone(), KeyPath::from(key));
        self.rt
            .block_on(async move { store.put(&key, PutPayload::from_bytes(Bytes::from(data))).await })
            .map(|_| ())
            .map_err(io::Error::other)
    }
}
