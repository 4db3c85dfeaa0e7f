//! One storage interface over the `object_store` crate: a local directory,
//! S3 (and S3-compatible servers), Google Cloud Storage and Azure Blob
//! Storage. The engine never branches on the backend: it sees [`Store`],
//! whose keys are relative to the repository's location.
//!
//! Where each backend takes its settings (credentials stay out of the
//! repository options except S3's, as `object_store` reads them from the
//! environment):
//!
//! - `s3://bucket/prefix`: `endpoint`, `region`, `path-style`, the access
//!   keys, else the `AWS_*` variables;
//! - `az://container/prefix`: `endpoint` is the blob service URL (default
//!   `https://ACCOUNT.blob.core.windows.net`; Azurite's is
//!   `http://HOST:PORT/devstoreaccount1`); the account and its credential
//!   come from the `AZURE_STORAGE_*` variables (`AZURE_STORAGE_ACCOUNT_NAME`
//!   and `AZURE_STORAGE_ACCOUNT_KEY`, a SAS token, a service principal, a
//!   managed identity), or `AZURE_STORAGE_USE_EMULATOR=true` selects the
//!   emulator's account at `AZURITE_BLOB_STORAGE_URL`;
//! - `gs://bucket/prefix`: `endpoint` is the base URL of the JSON API
//!   (default `https://storage.googleapis.com`); credentials from
//!   `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_APPLICATION_CREDENTIALS` or the
//!   instance's metadata server (`GOOGLE_SKIP_SIGNATURE=true` for an
//!   emulator that takes no authentication).
//!
//! `pgkeep` never creates a bucket or container: writing into a missing one
//! fails saying so.
//!
//! Local writes are atomic (temporary file, then rename) and fsynced by the
//! `object_store` local backend; object stores make a PUT visible whole or
//! not at all. That is what the repository's crash-safety argument rests on
//! (see `docs/repository-format.md`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as KeyPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};

use crate::error::{Error, Result};

pub mod testing;

/// Where a store is and how to reach it: a repository's `location`,
/// `endpoint`, `region`, `path-style`, access keys and `io-timeout`.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// A directory, or s3://, gs://, az:// with bucket and prefix.
    pub location: String,
    /// Endpoint URL of the service.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 path-style requests.
    pub path_style: Option<bool>,
    /// S3 access key id.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<String>,
    /// Seconds one request may take.
    pub io_timeout: Option<u64>,
}

/// Retries of transient store errors: exponential backoff from 100 ms,
/// at most 5 retries and one minute per request, so that a store that
/// stops answering gives a clear error in about a minute, not hangs.
fn retry(io_timeout: Duration) -> RetryConfig {
    RetryConfig { backoff: BackoffConfig::default(), max_retries: 5, retry_timeout: io_timeout.min(Duration::from_secs(60)) }
}

/// Connect within 5 s; any one request within `io_timeout`.
fn client(io_timeout: Duration) -> ClientOptions {
    ClientOptions::new().with_connect_timeout(Duration::from_secs(5).min(io_timeout)).with_timeout(io_timeout)
}

/// Default of `io-timeout`: how long one request to an object store may
/// take (an 8 MiB part on a slow link included).
pub const DEFAULT_IO_TIMEOUT: u64 = 120;

/// Does `endpoint` use plain HTTP (an emulator or a local server)?
fn is_http(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|e| e.starts_with("http://"))
}

/// How `object_store` reads a boolean setting from the environment.
fn truthy(value: &str) -> bool {
    ["1", "true", "on", "yes", "y"].iter().any(|t| value.trim().eq_ignore_ascii_case(t))
}

/// Wraps a store error of a write or a list, where "not found" can only
/// mean that the bucket or container itself is missing (a list of an
/// absent prefix is empty): a setup mistake, said so, not a store failure
/// worth retrying.
fn missing_bucket(what: String) -> impl FnOnce(object_store::Error) -> Error {
    move |e| {
        // Azure and GCS lists report a 404 as a generic error; the HTTP
        // status is only in its text (object_store 0.14 does not export
        // the error type that holds it).
        let not_found = matches!(e, object_store::Error::NotFound { .. })
            || (matches!(e, object_store::Error::Generic { .. }) && crate::error::one_line(&e).contains("status code: 404 "));
        if not_found {
            Error::Input(format!("{what}: its bucket or container does not exist; create it, or fix the location"))
        } else {
            Error::storage(what)(e)
        }
    }
}

/// The key that a listed (encoded) path stands for. A key becomes an
/// `object_store` path with the characters it reserves (`%`, `#`, `?`,
/// non-ASCII, ...) percent-encoded, and lists give that encoded form back:
/// decoding it makes a listed key name the same object again when read,
/// written or deleted (a file name in a data directory may hold any of
/// them).
fn key_of(encoded: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = encoded.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| encoded.to_owned())
}

/// A repository's store, with keys relative to its location.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
    /// The directory of a local store: what [`Store::delete_dir`] also
    /// clears of what `object_store` does not list.
    local: Option<std::path::PathBuf>,
}

/// One stored object as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Key relative to the location the list started from.
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// When the store last wrote it.
    pub modified: chrono::DateTime<chrono::Utc>,
}

impl Store {
    /// A store over any `object_store` implementation (an in-memory one,
    /// a wrapper that injects failures); `location` names it in messages.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Store {
        Store { inner, location: location.into(), local: None }
    }

    /// An empty store in memory.
    pub fn memory() -> Store {
        Store::from_object_store(Arc::new(object_store::memory::InMemory::new()), "memory://")
    }

    /// Opens the store named by a repository's `location`.
    pub fn open(opts: &StoreOptions) -> Result<Store> {
        let location = opts.location.clone();
        let bad = |why: String| Error::Input(format!("repository location '{location}': {why}"));
        let (scheme, rest) = match location.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("file", location.as_str()),
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let io_timeout = Duration::from_secs(opts.io_timeout.unwrap_or(DEFAULT_IO_TIMEOUT).max(1));
        let inner: Arc<dyn ObjectStore> = match scheme {
            "file" => {
                let dir = std::path::Path::new(rest);
                if !dir.is_absolute() {
                    return Err(bad("a local repository needs an absolute path".into()));
                }
                std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create the directory: {e}")))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                let local = Some(dir.to_owned());
                return Ok(Store { inner: Arc::new(fs), location, local });
            }
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry(io_timeout))
                    .with_client_options(client(io_timeout));
                if let Some(ep) = &opts.endpoint {
                    b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://"));
                }
                b = b.with_region(opts.region.clone().unwrap_or_else(|| {
                    std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION")).unwrap_or_else(|_| "us-east-1".into())
                }));
                b = b.with_virtual_hosted_style_request(!opts.path_style.unwrap_or(opts.endpoint.is_some()));
                if let Some(k) = &opts.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = &opts.secret_access_key {
                    b = b.with_secret_access_key(k);
                }
                Arc::new(b.build().map_err(|e| bad(crate::error::one_line(&e)))?)
            }
            "gs" => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry(io_timeout))
                    .with_client_options(client(io_timeout).with_allow_http(is_http(opts.endpoint.as_deref())));
                if let Some(ep) = &opts.endpoint {
                    b = b.with_base_url(ep.trim_end_matches('/'));
                }
                Arc::new(b.build().map_err(|e| bad(crate::error::one_line(&e)))?)
            }
            "az" => {
                use object_store::azure::AzureConfigKey;
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_retry(retry(io_timeout))
                    .with_client_options(client(io_timeout));
                let emulator = b.get_config_value(&AzureConfigKey::UseEmulator).is_some_and(|v| truthy(&v));
                match &opts.endpoint {
                    Some(_) if emulator => {
                        return Err(bad("endpoint and AZURE_STORAGE_USE_EMULATOR are both set; drop one (the emulator's \
                                        address is AZURITE_BLOB_STORAGE_URL, default http://127.0.0.1:10000)"
                            .into()))
                    }
                    Some(ep) => b = b.with_endpoint(ep.trim_end_matches('/').to_owned()).with_allow_http(is_http(Some(ep))),
                    None => {}
                }
                if !emulator && b.get_config_value(&AzureConfigKey::AccountName).is_none() {
                    return Err(bad("no storage account: set AZURE_STORAGE_ACCOUNT_NAME and a credential such as \
                                    AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_USE_EMULATOR=true for Azurite)"
                        .into()));
                }
                Arc::new(b.build().map_err(|e| bad(crate::error::one_line(&e)))?)
            }
            other => return Err(bad(format!("unknown scheme '{other}://'; use a directory, s3://, gs:// or az://"))),
        };
        let inner: Arc<dyn ObjectStore> =
            if prefix.trim_matches('/').is_empty() { inner } else { Arc::new(PrefixStore::new(inner, prefix.trim_matches('/'))) };
        Ok(Store { inner, location, local: None })
    }

    /// The location this store was opened from, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// A store whose keys are under `dir` of this one.
    pub fn sub(&self, dir: &str) -> Store {
        Store {
            inner: Arc::new(PrefixStore::new(self.inner.clone(), dir)),
            location: format!("{}/{}", self.location.trim_end_matches('/'), dir),
            local: self.local.as_ref().map(|l| l.join(dir)),
        }
    }

    /// The underlying object store, for streaming readers and writers.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.clone()
    }

    /// Reads a whole object; `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self.inner.get(&KeyPath::from(key)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(Error::storage(self.what("read", key)))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::storage(self.what("read", key))(e)),
        }
    }

    /// Writes a whole object. With `create_only`, an existing object is left
    /// alone and `Ok(false)` returned (where the store enforces it).
    pub async fn put(&self, key: &str, data: Bytes, create_only: bool) -> Result<bool> {
        let mode = if create_only { PutMode::Create } else { PutMode::Overwrite };
        let opts = PutOptions { mode, ..Default::default() };
        match self.inner.put_opts(&KeyPath::from(key), PutPayload::from_bytes(data), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(missing_bucket(self.what("write", key))(e)),
        }
    }

    /// Lists every object under `dir` (recursively), keys relative to `dir`.
    pub async fn list(&self, dir: &str) -> Result<Vec<Listed>> {
        let prefix = KeyPath::from(dir);
        let strip = if dir.is_empty() { 0 } else { prefix.as_ref().len() + 1 };
        let metas: Vec<ObjectMeta> = self
            .inner
            .list(if dir.is_empty() { None } else { Some(&prefix) })
            .try_collect()
            .await
            .map_err(missing_bucket(self.what_list(dir)))?;
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                key: key_of(&m.location.as_ref()[strip.min(m.location.as_ref().len())..]),
                size: m.size,
                modified: m.last_modified,
            })
            .collect())
    }

    /// Names of the immediate "directories" under `dir`.
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = KeyPath::from(dir);
        let r = self
            .inner
            .list_with_delimiter(if dir.is_empty() { None } else { Some(&prefix) })
            .await
            .map_err(missing_bucket(self.what_list(dir)))?;
        Ok(r.common_prefixes.iter().filter_map(|p| p.filename().map(key_of)).collect())
    }

    /// Deletes every object under `dir` (a path of plain names, else
    /// nothing). A local store's directory goes too, with what a killed
    /// writer left in it: `object_store` stages an upload as `<name>#<n>`
    /// beside its destination and never lists it, so deleting the listed
    /// objects alone would leave those behind.
    pub async fn delete_dir(&self, dir: &str) -> Result<()> {
        // Only a directory whose every part is a plain name (what pgkeep
        // writes: letters, digits, '-', '_', '.'), which object_store keeps
        // as it is on disk; anything else (`..`, an empty part, an escaped
        // name that decodes to another path) is left alone.
        let plain = |p: &str| !p.is_empty() && p != "." && p != ".." && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !dir.split('/').all(plain) {
            return Ok(());
        }
        let keys = self.list(dir).await?.into_iter().map(|l| format!("{dir}/{}", l.key)).collect();
        self.delete_all(keys).await?;
        let Some(path) = self.local.as_ref().map(|l| l.join(dir)) else { return Ok(()) };
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(format!("cannot remove {}", path.display()))(e)),
            _ => Ok(()),
        }
    }

    /// Deletes objects; missing ones are not an error.
    pub async fn delete_all(&self, keys: Vec<String>) -> Result<()> {
        let paths = futures::stream::iter(keys.into_iter().map(|k| Ok(KeyPath::from(k)))).boxed();
        let mut results = self.inner.delete_stream(paths);
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::storage(format!("cannot delete from {}", self.location))(e)),
            }
        }
        Ok(())
    }

    pub(crate) fn what(&self, verb: &str, key: &str) -> String {
        format!("cannot {verb} '{key}' in repository {}", self.location)
    }

    fn what_list(&self, dir: &str) -> String {
        if dir.is_empty() {
            format!("cannot list repository {}", self.location)
        } else {
            self.what("list", dir)
        }
    }
}

mod sync_io;
pub use sync_io::{ObjectReader, ObjectWriter};

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed backup leaves `object_store`'s staged uploads
    /// (`<name>#<n>`), which no list shows; removing the backup's
    /// directory must take them, and the directory, too.
    #[tokio::test]
    async fn delete_dir_removes_a_local_directory_with_the_uploads_a_killed_writer_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreOptions { location: dir.path().to_str().unwrap().into(), ..Default::default() }).unwrap();
        store.put("backup/L/pg_data/a.zst", Bytes::from_static(b"a"), false).await.unwrap();
        store.put("backup/M/manifest.json", Bytes::from_static(b"m"), false).await.unwrap();
        std::fs::write(dir.path().join("backup/L/pg_data/b.zst#1"), b"half").unwrap();
        assert_eq!(store.list("backup/L").await.unwrap().len(), 1, "object_store lists the staged upload after all");
        store.delete_dir("backup/L").await.unwrap();
        assert!(!dir.path().join("backup/L").exists(), "the directory outlived its objects");
        assert!(store.get("backup/M/manifest.json").await.unwrap().is_some(), "another backup's object went too");
        store.sub("backup").delete_dir("M").await.unwrap();
        assert!(!dir.path().join("backup/M").exists());
        // A name that is not plain never reaches the file system: a listed
        // directory `%2E%2E` decodes to `..`, the stanza's own parent.
        store.put("backup/N/a", Bytes::from_static(b"n"), false).await.unwrap();
        for bad in ["backup/..", "backup/", "..", "backup/N/../.."] {
            store.delete_dir(bad).await.unwrap();
            assert!(dir.path().join("backup/N/a").exists(), "delete_dir({bad:?}) reached outside its directory");
        }
    }

    #[test]
    fn listed_keys_decode_to_the_keys_written() {
        for key in ["archive/0000000100000000/000000010000000000000001-abc.zst", "pg_data/odd name+1%#é?*~[x].conf", "a/%41/b", "100%"] {
            let path = KeyPath::from(key);
            let listed: Vec<String> = path.parts().map(|p| key_of(p.as_ref())).collect();
            assert_eq!(listed.join("/"), key, "{} lists back as another key", path.as_ref());
        }
        assert_eq!(key_of("bad%zz%4"), "bad%zz%4", "malformed escapes stay as they are");
    }
}
