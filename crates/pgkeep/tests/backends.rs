//! One conformance suite for every storage backend, run against real
//! servers: a local directory, S3 (moto), Azure Blob (Azurite) and, for
//! reads only, Google Cloud Storage (fake-gcs-server, which answers
//! `object_store`'s writes with 400, so its objects are seeded at start).
//!
//! Each check exercises what the engine relies on through the same API the
//! engine uses, `pgkeep_core::storage::{Store, ObjectReader, ObjectWriter}`:
//! whole reads and writes, "missing" as `None`, overwrite, put-if-absent,
//! recursive lists with sizes, "directory" lists, deletes that tolerate
//! missing keys, and streaming multipart writes read back in ranges, on keys
//! shaped like the repository's own (WAL names, backup labels, data file
//! paths, an odd file name from a data directory).
//!
//! A new backend is one line at the bottom: a name and a function that
//! gives a [`Backend`].

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use bytes::Bytes;
use pgkeep_core::config::RepoOptions;
use pgkeep_core::storage::{ObjectReader, ObjectWriter, Store};
use support::*;

/// The size of one part of a streaming write (`sync_io::PART_SIZE`).
const PART: usize = 8 << 20;

/// A backend under test: an empty store, whether it takes writes, and the
/// server it talks to (kept alive until the suite ends).
struct Backend {
    store: Store,
    writable: bool,
    /// The same server with a bucket or container that does not exist
    /// (none for a local directory, which is created).
    missing_bucket: Option<Store>,
    _server: Box<dyn std::any::Any>,
}

/// The objects every backend must hold and serve back, under a stanza as
/// the engine lays it out.
fn fixture() -> BTreeMap<&'static str, Vec<u8>> {
    let mut f = BTreeMap::new();
    f.insert("stanza.json", br#"{"format":1,"stanza":"demo"}"#.to_vec());
    f.insert("archive/0000000100000000/000000010000000000000001-abc.zst", pseudo_random(1, 70_001));
    f.insert("archive/0000000100000000/000000010000000000000002.00000028.backup-0f1e.zst", b"backup history".to_vec());
    f.insert("archive/00000002.history-5d2c.zst", b"1\t0/3000000\tbefore 2000-01-01\n".to_vec());
    f.insert("backup/20261123-101010F/manifest.json", b"{}".to_vec());
    f.insert("backup/20261123-101010F/pg_data/base/1/1259.part1", pseudo_random(2, 3 * PART + 12_345));
    f.insert("backup/20261123-101010F/pg_data/base/1/2619_vm.zst", Vec::new());
    f.insert("backup/20261123-101010F/pg_data/pg_log/odd name+1%#é.conf", b"a file name PostgreSQL does not control".to_vec());
    f.insert("backup/20261123-101010F_20261124-121212I/pg_tblspc/16385/PG_15_202209061/5/16386", pseudo_random(3, 8192));
    f.insert("lock/1.json", b"{\"generation\":1}".to_vec());
    f
}

/// The fixture's large object, written by streaming in several parts.
const LARGE: &str = "backup/20261123-101010F/pg_data/base/1/1259.part1";

/// Deterministic bytes that do not compress.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What a check gets: the stanza's store (as `Repository` uses it) and a
/// runtime for async calls; blocking readers and writers run on this thread.
struct Ctx {
    stanza: Store,
    rt: tokio::runtime::Runtime,
}

impl Ctx {
    fn get(&self, key: &str) -> Option<Bytes> {
        self.rt.block_on(self.stanza.get(key)).unwrap_or_else(|e| panic!("get {key}: {e}"))
    }
    fn put(&self, key: &str, data: &[u8], create_only: bool) -> bool {
        self.rt.block_on(self.stanza.put(key, Bytes::copy_from_slice(data), create_only)).unwrap_or_else(|e| panic!("put {key}: {e}"))
    }
    fn list(&self, dir: &str) -> BTreeMap<String, u64> {
        let listed = self.rt.block_on(self.stanza.list(dir)).unwrap_or_else(|e| panic!("list {dir:?}: {e}"));
        listed.into_iter().map(|l| (l.key, l.size)).collect()
    }
    fn list_dirs(&self, dir: &str) -> Vec<String> {
        let mut d = self.rt.block_on(self.stanza.list_dirs(dir)).unwrap_or_else(|e| panic!("list_dirs {dir:?}: {e}"));
        d.sort();
        d
    }
    fn write_streaming(&self, key: &str, data: &[u8]) {
        let mut w = ObjectWriter::new(self.stanza.object_store(), key, self.rt.handle().clone());
        // Uneven writes, as a compressor hands them over.
        for chunk in data.chunks(1_000_003) {
            w.write_all(chunk).unwrap_or_else(|e| panic!("streaming write of {key}: {e}"));
        }
        assert_eq!(w.finish().unwrap_or_else(|e| panic!("finishing {key}: {e}")), data.len() as u64);
    }
    fn read_range(&self, key: &str, range: Option<std::ops::Range<u64>>) -> Vec<u8> {
        let what = format!("{key} {range:?}");
        let mut r = ObjectReader::open(self.stanza.object_store(), key, range, self.rt.handle().clone())
            .unwrap_or_else(|e| panic!("open {what}: {e}"));
        let mut out = Vec::new();
        let mut buf = vec![0; 65_537];
        loop {
            let n = r.read(&mut buf).unwrap_or_else(|e| panic!("read {what}: {e}"));
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(r.read, out.len() as u64, "ObjectReader::read counts the bytes of {what}");
        out
    }
}

/// Writes the fixture the way the engine writes: small objects whole with
/// put-if-absent, the large one streamed in parts.
fn write_fixture(cx: &Ctx) {
    for (key, data) in fixture() {
        if key == LARGE {
            cx.write_streaming(key, &data);
        } else {
            assert!(cx.put(key, &data, true), "put-if-absent of new {key} was refused");
        }
    }
}

// ---------------------------------------------------------------- checks on every backend

fn whole_reads_give_back_every_object(cx: &Ctx) {
    for (key, data) in fixture() {
        let got = cx.get(key).unwrap_or_else(|| panic!("{key} is missing"));
        assert!(got == data, "{key}: read {} bytes, wrote {}, or different bytes", got.len(), data.len());
    }
}

fn missing_objects_read_as_none(cx: &Ctx) {
    for key in ["archive/0000000100000000/000000010000000000000009-abc.zst", "backup/20261123-101010F", "nothing/here"] {
        assert!(cx.get(key).is_none(), "get of missing {key} must be None");
    }
}

fn recursive_lists_give_keys_and_sizes(cx: &Ctx) {
    let f = fixture();
    let all: BTreeMap<String, u64> = f.iter().map(|(k, v)| (k.to_string(), v.len() as u64)).collect();
    assert_eq!(cx.list(""), all, "list of the whole stanza");
    let under = |dir: &str| -> BTreeMap<String, u64> {
        all.iter().filter_map(|(k, s)| Some((k.strip_prefix(&format!("{dir}/"))?.to_owned(), *s))).collect()
    };
    for dir in ["archive", "archive/0000000100000000", "backup", "backup/20261123-101010F/pg_data"] {
        let expected = under(dir);
        assert!(!expected.is_empty());
        assert_eq!(cx.list(dir), expected, "list of {dir}, keys relative to it");
    }
    assert!(cx.list("backup/29991231-000000F").is_empty(), "list of an absent prefix is empty");
    // A prefix of a name is not a directory.
    assert!(cx.list("archive/00000001").is_empty(), "list of archive/00000001 matched by name prefix");
}

fn directory_lists_give_immediate_names(cx: &Ctx) {
    assert_eq!(cx.list_dirs(""), ["archive", "backup", "lock"]);
    assert_eq!(cx.list_dirs("backup"), ["20261123-101010F", "20261123-101010F_20261124-121212I"]);
    assert_eq!(cx.list_dirs("archive"), ["0000000100000000"]);
    assert_eq!(cx.list_dirs("backup/20261123-101010F/pg_data"), ["base", "pg_log"]);
    assert!(cx.list_dirs("lock").is_empty(), "lock holds objects, no directories");
    assert!(cx.list_dirs("nothing").is_empty());
}

fn ranged_reads_give_the_right_bytes(cx: &Ctx) {
    let data = &fixture()[LARGE];
    let len = data.len() as u64;
    assert!(cx.read_range(LARGE, None) == *data, "whole streamed read of {LARGE}");
    let p = PART as u64;
    for range in [0..1, 0..4096, p - 100..p + 100, 2 * p - 1..2 * p + 1, 5_000_000..len, len - 1..len, 123..len - 123] {
        let got = cx.read_range(LARGE, Some(range.clone()));
        assert!(got == data[range.start as usize..range.end as usize], "range {range:?} of {LARGE} ({} bytes back)", got.len());
    }
    let small = "archive/0000000100000000/000000010000000000000001-abc.zst";
    let got = cx.read_range(small, Some(100..200));
    assert!(got == fixture()[small][100..200], "range of {small}");
}

// ---------------------------------------------------------------- checks on writable backends

fn overwrite_replaces_the_content(cx: &Ctx) {
    let key = "scratch/overwrite/manifest.json";
    assert!(cx.put(key, b"first", false));
    assert!(cx.put(key, b"second, longer", false), "overwrite reported as refused");
    assert_eq!(cx.get(key).as_deref(), Some(&b"second, longer"[..]));
    assert_eq!(cx.list("scratch/overwrite"), BTreeMap::from([("manifest.json".to_owned(), 14)]));
}

fn put_if_absent_refuses_a_second_create(cx: &Ctx) {
    let key = "scratch/create/archive/000000010000000000000003-abc.zst";
    assert!(cx.put(key, b"winner", true), "first create refused");
    assert!(!cx.put(key, b"loser", true), "second create of {key} was not refused");
    assert_eq!(cx.get(key).as_deref(), Some(&b"winner"[..]), "a refused create changed the content");
    let existing = "lock/1.json";
    assert!(!cx.put(existing, b"taken over", true), "create over the fixture's {existing} was not refused");
    assert_eq!(cx.get(existing).as_deref(), Some(&fixture()[existing][..]));
}

fn empty_objects_are_stored(cx: &Ctx) {
    assert!(cx.put("scratch/empty/whole", b"", true));
    cx.write_streaming("scratch/empty/streamed", b"");
    for key in ["scratch/empty/whole", "scratch/empty/streamed"] {
        assert_eq!(cx.get(key).as_deref(), Some(&b""[..]), "{key}");
    }
    assert_eq!(cx.list("scratch/empty"), BTreeMap::from([("streamed".to_owned(), 0), ("whole".to_owned(), 0)]));
}

fn delete_all_tolerates_missing_keys(cx: &Ctx) {
    let keys = ["scratch/delete/a", "scratch/delete/sub/b", "scratch/delete/c"];
    for k in keys {
        assert!(cx.put(k, k.as_bytes(), false));
    }
    let doomed = vec!["scratch/delete/a".to_owned(), "scratch/delete/sub/b".to_owned(), "scratch/delete/never-written".to_owned()];
    cx.rt.block_on(cx.stanza.delete_all(doomed.clone())).unwrap_or_else(|e| panic!("delete_all with a missing key: {e}"));
    assert!(cx.get("scratch/delete/a").is_none() && cx.get("scratch/delete/sub/b").is_none(), "deleted objects still readable");
    assert_eq!(cx.list("scratch/delete"), BTreeMap::from([("c".to_owned(), 16)]), "only the undeleted object is left");
    cx.rt.block_on(cx.stanza.delete_all(doomed)).unwrap_or_else(|e| panic!("delete_all of deleted keys: {e}"));
}

fn an_unfinished_streaming_write_leaves_nothing(cx: &Ctx) {
    let key = "scratch/abandoned/1259";
    {
        let mut w = ObjectWriter::new(cx.stanza.object_store(), key, cx.rt.handle().clone());
        // More than a part: the multipart upload has begun.
        w.write_all(&pseudo_random(4, PART + 1_000)).unwrap();
        // Dropped without finish(): the upload is aborted.
    }
    assert!(cx.get(key).is_none(), "an abandoned streaming write left {key} behind");
    assert!(cx.list("scratch/abandoned").is_empty(), "an abandoned streaming write is listed");
}

/// Lists (and writes, where the backend takes them) into a bucket or
/// container that does not exist fail in one line that names the
/// repository and says so.
fn a_missing_bucket_is_named(rt: &tokio::runtime::Runtime, store: &Store, writable: bool) {
    let check = |what: &str, e: pgkeep_core::Error| {
        let msg = e.to_string();
        assert!(
            msg.contains(store.location()) && msg.contains("does not exist") && !msg.contains('\n'),
            "{what} into a missing bucket: {msg}"
        );
    };
    check("list", rt.block_on(store.list("")).expect_err("list of a missing bucket succeeded"));
    check("list_dirs", rt.block_on(store.list_dirs("backup")).expect_err("list_dirs of a missing bucket succeeded"));
    if writable {
        check("put", rt.block_on(store.put("stanza.json", Bytes::from_static(b"{}"), true)).expect_err("put into a missing bucket"));
    }
}

// ---------------------------------------------------------------- the suite

type Check = (&'static str, fn(&Ctx));

const READ_CHECKS: &[Check] = &[
    ("whole_reads_give_back_every_object", whole_reads_give_back_every_object),
    ("missing_objects_read_as_none", missing_objects_read_as_none),
    ("recursive_lists_give_keys_and_sizes", recursive_lists_give_keys_and_sizes),
    ("directory_lists_give_immediate_names", directory_lists_give_immediate_names),
    ("ranged_reads_give_the_right_bytes", ranged_reads_give_the_right_bytes),
];

const WRITE_CHECKS: &[Check] = &[
    ("overwrite_replaces_the_content", overwrite_replaces_the_content),
    ("put_if_absent_refuses_a_second_create", put_if_absent_refuses_a_second_create),
    ("empty_objects_are_stored", empty_objects_are_stored),
    ("delete_all_tolerates_missing_keys", delete_all_tolerates_missing_keys),
    ("an_unfinished_streaming_write_leaves_nothing", an_unfinished_streaming_write_leaves_nothing),
];

/// Runs every check that applies (each even when an earlier one failed,
/// so one run tells what works) and fails naming those that did not pass.
fn conformance(backend: fn() -> Backend) {
    credentials_in_env();
    let b = backend();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cx = Ctx { stanza: b.store.sub("demo"), rt };
    eprintln!("backend {}: {}", if b.writable { "read-write" } else { "read-only" }, cx.stanza.location());
    if b.writable {
        write_fixture(&cx);
    }
    let checks = READ_CHECKS.iter().chain(if b.writable { WRITE_CHECKS } else { &[] });
    let mut failed: Vec<&str> = checks
        .filter(|(name, check)| {
            let r = catch_unwind(AssertUnwindSafe(|| check(&cx)));
            eprintln!("{}: {name}: {}", cx.stanza.location(), if r.is_ok() { "ok" } else { "FAILED" });
            r.is_err()
        })
        .map(|(name, _)| *name)
        .collect();
    if let Some(missing) = &b.missing_bucket {
        let r = catch_unwind(AssertUnwindSafe(|| a_missing_bucket_is_named(&cx.rt, missing, b.writable)));
        eprintln!("{}: a_missing_bucket_is_named: {}", missing.location(), if r.is_ok() { "ok" } else { "FAILED" });
        if r.is_err() {
            failed.push("a_missing_bucket_is_named");
        }
    }
    assert!(failed.is_empty(), "{} failed these checks (details above): {failed:?}", cx.stanza.location());
}

/// The emulators' credentials, as a user would give them: in the
/// environment, read by `object_store` (the endpoints are in each
/// repository's options). Every test here sets them, once and the same,
/// before it starts anything.
fn credentials_in_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in Azurite::credentials() {
            std::env::set_var(k, v);
        }
        // fake-gcs-server wants no authentication; without this
        // object_store would ask a GCE metadata server for a token.
        std::env::set_var("GOOGLE_SKIP_SIGNATURE", "true");
    });
}

fn options(location: String) -> RepoOptions {
    RepoOptions { location: Some(location), io_timeout: Some(30), ..Default::default() }
}

fn open(opts: RepoOptions) -> Store {
    Store::open(&opts.store()).unwrap_or_else(|e| panic!("{e}"))
}

fn local() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = open(options(dir.path().join("repo").display().to_string()));
    Backend { store, writable: true, missing_bucket: None, _server: Box::new(dir) }
}

fn s3_moto() -> Backend {
    let moto = Moto::start("conformance");
    let opts = |location: &str| RepoOptions {
        endpoint: Some(moto.endpoint.clone()),
        path_style: Some(true),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        ..options(location.into())
    };
    let (store, missing) = (open(opts("s3://conformance/some/prefix")), open(opts("s3://no-such-bucket/some/prefix")));
    Backend { store, writable: true, missing_bucket: Some(missing), _server: Box::new(moto) }
}

fn azure_azurite() -> Backend {
    let azurite = Azurite::start("conformance");
    let opts = |location: &str| RepoOptions { endpoint: Some(azurite.endpoint.clone()), ..options(location.into()) };
    let (store, missing) = (open(opts("az://conformance/some/prefix")), open(opts("az://no-such-container/some/prefix")));
    Backend { store, writable: true, missing_bucket: Some(missing), _server: Box::new(azurite) }
}

fn gcs_fake_gcs_server() -> Backend {
    let seed = tempfile::tempdir().unwrap();
    for (key, data) in fixture() {
        // Named as object_store names the object of a key.
        let path = seed.path().join("conformance/some/prefix/demo").join(object_store::path::Path::from(key).as_ref());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    }
    let gcs = FakeGcs::start(Path::new(seed.path()));
    let opts = RepoOptions { endpoint: Some(gcs.endpoint.clone()), ..options("gs://conformance/some/prefix".into()) };
    // fake-gcs-server answers a list of a missing bucket with 500 ("no
    // bucket named ..."), not with a 404: nothing to check there.
    Backend { store: open(opts), writable: false, missing_bucket: None, _server: Box::new((gcs, seed)) }
}

/// One `#[test]` per backend.
macro_rules! backends {
    ($($test:ident => $backend:ident;)*) => {$(
        #[test]
        fn $test() {
            conformance($backend)
        }
    )*};
}

backends! {
    local_directory => local;
    s3_on_moto => s3_moto;
    azure_on_azurite => azure_azurite;
    gcs_reads_on_fake_gcs_server => gcs_fake_gcs_server;
}
