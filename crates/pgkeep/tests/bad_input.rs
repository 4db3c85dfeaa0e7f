//! Wrong input, wrong state and damaged repositories. Every case must fail
//! with a non-zero exit and a one-line message (checked by `Pgkeep::fails`)
//! and must change nothing: the repository's files stay byte for byte the
//! same and a restore target stays absent or as it was.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use support::*;

/// A cluster with its stanza created in a local repository, archiving to it.
struct Stanza {
    pg: Cluster,
    pk: Pgkeep,
    repo: PathBuf,
    dir: TestDir, // last: dropped after the cluster
}

impl Stanza {
    fn created(name: &str) -> Stanza {
        let dir = TestDir::new(name);
        let repo = Repo::local(&dir, "repo");
        let (pg, pk) = cluster_with_config(&dir, "demo", &repo);
        pk.ok(&["stanza-create"]);
        pk.ok(&["check"]);
        Stanza { pg, pk, repo: repo.path().to_owned(), dir }
    }

    /// [`Stanza::created`] plus some data and one full backup; returns its label.
    fn backed_up(name: &str) -> (Stanza, String) {
        let s = Stanza::created(name);
        s.pg.psql("create table t as select g as id, md5(g::text) as v from generate_series(1, 50000) g");
        let label = s.pk.ok(&["backup", "--type", "full"]).trim().to_owned();
        assert!(is_full_label(&label), "backup printed {label:?}");
        // The backup history file pg_backup_stop wrote is archived after
        // the backup returns: once a later segment is archived, so is it,
        // and the repository stays as it is for the tests that compare it.
        s.pg.psql("select pg_logical_emit_message(false, 'pgkeep-test', 'a record to switch from')");
        let seg = s.pg.switch_wal();
        s.pg.wait_archived(&seg);
        (s, label)
    }

    /// `restore --pg-data <target> <args>` must fail and leave the target
    /// absent or empty and the repository unchanged; returns the message.
    fn restore_fails(&self, target: &Path, args: &[&str]) -> String {
        let before = snapshot(&self.repo);
        let mut all = vec!["restore", "--pg-data", target.to_str().unwrap()];
        all.extend_from_slice(args);
        let msg = self.pk.fails(&all);
        assert_absent_or_empty(target);
        assert!(snapshot(&self.repo) == before, "a failed restore changed the repository");
        msg
    }

    fn backup_dir(&self, label: &str) -> PathBuf {
        self.repo.join("demo/backup").join(label).join("pg_data")
    }

    /// A completed, archived segment: its name and a copy of its bytes.
    fn archived_segment(&self) -> (String, Vec<u8>) {
        self.pg.psql("create table if not exists churn (x int); insert into churn values (1)");
        let seg = self.pg.switch_wal();
        let bytes = std::fs::read(self.pg.addr.data.join("pg_wal").join(&seg)).unwrap();
        self.pg.wait_archived(&seg);
        (seg, bytes)
    }

    /// The stored objects of WAL segment `seg`.
    fn wal_objects(&self, seg: &str) -> Vec<PathBuf> {
        snapshot(&self.repo.join("demo/archive"))
            .into_keys()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(seg))
            .collect()
    }
}

/// Writes `bytes` as `dir/sub/name` (for archive-push) and returns the path.
fn wal_file(dir: &TestDir, sub: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.mkdir(sub).join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// A config pointing at a server that is not there.
fn config_without_server(dir: &TestDir, repo: &Repo) -> Pgkeep {
    let pk = Pgkeep::new(dir, "nowhere", "demo");
    pk.write_config(&PgAddr { data: dir.join("no-data"), socket_dir: dir.path().to_owned(), port: free_port() }, repo);
    pk
}

// ---------------------------------------------------------------- config

#[test]
fn missing_config_file_is_refused() {
    let dir = TestDir::new("bad-config-missing");
    let before = snapshot(dir.path());
    let pk = Pgkeep::new(&dir, "does-not-exist", "demo");
    let msg = pk.fails(&["stanza-create"]);
    assert!(msg.contains("does-not-exist.toml"), "the message should name the missing file: {msg}");
    assert!(snapshot(dir.path()) == before, "a failed command wrote files");
}

#[test]
fn unknown_config_key_is_refused() {
    let dir = TestDir::new("bad-config-key");
    let repo = dir.join("repo");
    let pk = Pgkeep::new(&dir, "typo", "demo");
    pk.write_raw_config(&format!(
        "[stanza.demo]\npg-dta = \"{}\"\npg-host = \"{}\"\n\n[[repo]]\nlocation = \"{}\"\n",
        dir.join("data").display(),
        dir.path().display(),
        repo.display()
    ));
    let msg = pk.fails(&["stanza-create"]);
    assert!(msg.contains("pg-dta"), "the message should name the unknown key: {msg}");
    assert!(!repo.exists(), "a refused config created the repository");
}

#[test]
fn stanza_not_in_config_is_refused() {
    let dir = TestDir::new("bad-config-stanza");
    let repo = Repo::Local(dir.join("repo"));
    let pk = config_without_server(&dir, &repo).with_stanza("other");
    let msg = pk.fails(&["stanza-create"]);
    assert!(msg.contains("other"), "the message should name the stanza: {msg}");
    assert!(!repo.path().exists(), "a refused stanza created the repository");
}

// ---------------------------------------------------------------- state

#[test]
fn backup_and_archive_push_before_stanza_create_are_refused() {
    let dir = TestDir::new("bad-no-stanza");
    let repo = Repo::local(&dir, "repo");
    let (pg, pk) = cluster_with_config(&dir, "demo", &repo);
    let seg = pg.current_segment();
    let copy = wal_file(&dir, "wal", &seg, &std::fs::read(pg.addr.data.join("pg_wal").join(&seg)).unwrap());

    pk.fails(&["backup", "--type", "full"]);
    pk.fails(&["archive-push", copy.to_str().unwrap()]);
    pk.fails(&["backup"]);
    assert!(snapshot(repo.path()).is_empty(), "refused commands wrote into the repository");
}

#[test]
fn unreachable_postgresql_is_reported() {
    // No server at all: stanza-create writes nothing.
    let s = Stanza::created("bad-unreachable");
    let fresh = Repo::local(&s.dir, "fresh-repo");
    config_without_server(&s.dir, &fresh).fails(&["stanza-create"]);
    assert!(snapshot(fresh.path()).is_empty(), "stanza-create without a server wrote into the repository");

    // An existing stanza whose server is not where the config says.
    let wrong_port = Pgkeep::new(&s.dir, "wrong-port", "demo");
    wrong_port.write_config(&PgAddr { port: free_port(), ..s.pg.addr.clone() }, &Repo::Local(s.repo.clone()));
    let before = snapshot(&s.repo);
    wrong_port.fails(&["backup", "--type", "full"]);
    wrong_port.fails(&["check"]);
    assert!(snapshot(&s.repo) == before, "commands without a server changed the repository");
}

// ---------------------------------------------------------------- one repository, one cluster

#[test]
fn second_cluster_can_neither_create_the_stanza_nor_push_wal_into_it() {
    let a = Stanza::created("bad-second-cluster");
    let b = Cluster::new(&a.dir, "b-data", None);
    assert_ne!(a.pg.system_id(), b.system_id());
    let b_pk = Pgkeep::new(&a.dir, "b", "demo");
    b_pk.write_config(&b.addr, &Repo::Local(a.repo.clone()));
    let before = snapshot(&a.repo);

    b_pk.fails(&["stanza-create"]);
    assert!(snapshot(&a.repo) == before, "stanza-create of another cluster changed the repository");

    // A segment of B under a name A has not archived, pushed to A's stanza.
    for i in 0..6 {
        b.psql(&format!("create table churn{i} (x int)"));
        b.switch_wal();
    }
    // A write after the switch: the current segment's file exists (from
    // PostgreSQL 18 on, a switch does not create the next one).
    b.psql("create table after_switch (x int)");
    let seg = b.current_segment();
    assert!(a.wal_objects(&seg).is_empty(), "test setup: A already archived {seg}");
    let foreign = wal_file(&a.dir, "foreign", &seg, &std::fs::read(b.addr.data.join("pg_wal").join(&seg)).unwrap());
    a.pk.fails(&["archive-push", foreign.to_str().unwrap()]);
    assert!(snapshot(&a.repo) == before, "a segment of another cluster reached the repository");
}

/// Issue 12: WAL of another PostgreSQL major is refused in one line:
/// from a cluster of that major (another system), and under this cluster's
/// own system identifier with another major's page magic (what the
/// identifier alone cannot catch). Nothing reaches the repository.
#[test]
fn wal_of_another_major_is_refused_in_one_line() {
    let a = Stanza::created("bad-other-major");
    let other = if pg_major() == 18 { 15 } else { 18 };
    let b = Cluster::initdb(&a.dir, "b-data", None, &[], &pg_bin_of(other));
    b.pg_ctl_start(&[]);
    b.psql("create table t (x int)");
    let seg = b.current_segment();
    let before = snapshot(&a.repo);
    let foreign = wal_file(&a.dir, "foreign", &seg, &std::fs::read(b.addr.data.join("pg_wal").join(&seg)).unwrap());
    let msg = a.pk.fails(&["archive-push", foreign.to_str().unwrap()]);
    assert!(msg.contains("another cluster") || msg.contains("system"), "{msg}");
    assert!(snapshot(&a.repo) == before, "WAL of PostgreSQL {other} reached a PostgreSQL {} stanza", pg_major());

    // The stanza's own system, another major's page magic.
    let (seg, mut bytes) = a.archived_segment();
    let magic = pgkeep_core::pg::version::of_major(other).unwrap().wal_page_magic;
    bytes[..2].copy_from_slice(&magic.to_le_bytes());
    let next = format!("{}{:08X}", &seg[..16], u32::from_str_radix(&seg[16..], 16).unwrap() + 100);
    let before = snapshot(&a.repo);
    let doctored = wal_file(&a.dir, "doctored", &next, &bytes);
    let msg = a.pk.fails(&["archive-push", doctored.to_str().unwrap()]);
    assert!(msg.contains(&format!("PostgreSQL {other}'s WAL")) && msg.contains(&format!("PostgreSQL {}", pg_major())), "{msg}");
    assert!(snapshot(&a.repo) == before, "a segment with PostgreSQL {other}'s page magic reached the repository");
}

/// Issue 12: `archive-get` never hands recovery another system's segment,
/// even when the archive holds one under the name asked for (an object
/// copied in by hand, a bucket shared by mistake): recovery stops (exit
/// 255) with a one-line reason, and nothing is written.
#[test]
fn archive_get_refuses_a_segment_of_another_system_stored_under_the_name() {
    let a = Stanza::created("bad-get-foreign");
    let b_repo = Repo::local(&a.dir, "b-repo");
    let b_pk = Pgkeep::new(&a.dir, "b", "demo");
    let b = Cluster::new(&a.dir, "b-data", Some(&b_pk));
    b_pk.write_config(&b.addr, &b_repo);
    b_pk.ok(&["stanza-create"]);
    let mut seg = String::new();
    for i in 0..6 {
        b.psql(&format!("create table churn{i} (x int)"));
        seg = b.switch_wal();
    }
    b.wait_archived(&seg);
    assert!(a.wal_objects(&seg).is_empty(), "test setup: A already archived {seg}");
    let b_archive = b_repo.path().join("demo/archive");
    let object = snapshot(&b_archive).into_keys().find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&seg)).unwrap();
    let planted = a.repo.join("demo/archive").join(&object);
    // As the repository's owner, as anything writing there would be.
    run_ok(as_postgres("cp", a.dir.path()).arg(b_archive.join(&object)).arg(&planted), std::time::Duration::from_secs(30));

    let dest = a.dir.join("RECOVERYXLOG");
    let (code, msg) = a.pk.fails_code(&["archive-get", seg.as_str(), dest.to_str().unwrap()]);
    assert_eq!(code, 255, "another system's segment must stop recovery: {msg}");
    assert!(msg.contains(&format!("is of system {}", b.system_id())), "{msg}");
    assert!(!dest.exists(), "archive-get wrote another system's segment to {}", dest.display());
}

#[test]
fn archive_push_accepts_the_same_segment_again_but_never_overwrites_it() {
    let s = Stanza::created("bad-overwrite");
    let (seg, original) = s.archived_segment();
    assert_eq!(s.wal_objects(&seg).len(), 1, "{seg} should be archived once");
    let before = snapshot(&s.repo);

    let mut changed = original.clone();
    changed[original.len() / 2] ^= 0xff;
    let different = wal_file(&s.dir, "different", &seg, &changed);
    s.pk.fails(&["archive-push", different.to_str().unwrap()]);
    assert!(snapshot(&s.repo) == before, "a different file under an archived name changed the repository");

    let same = wal_file(&s.dir, "same", &seg, &original);
    s.pk.ok(&["archive-push", same.to_str().unwrap()]);
    assert!(snapshot(&s.repo) == before, "pushing the identical file again changed the repository");

    let got = s.dir.join("got");
    s.pk.ok(&["archive-get", seg.as_str(), got.to_str().unwrap()]);
    assert!(std::fs::read(&got).unwrap() == original, "archive-get must return the original segment");
}

// ---------------------------------------------------------------- damaged repository

#[test]
fn restore_fails_on_a_corrupted_or_truncated_backup_file() {
    let (s, label) = Stanza::backed_up("bad-damaged-backup");
    let data = s.backup_dir(&label);
    let files = files_by_size(&data.join("base"), ".zst");
    assert!(files.len() >= 2, "expected relation files in {}", data.display());

    type Damage = (&'static str, fn(&mut Vec<u8>));
    let damages: [Damage; 2] = [
        ("corrupted", |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
        }),
        ("truncated", |b| b.truncate(b.len() / 2)),
    ];
    for ((what, damage), object) in damages.into_iter().zip(&files) {
        let original = std::fs::read(object).unwrap();
        let mut bytes = original.clone();
        damage(&mut bytes);
        std::fs::write(object, &bytes).unwrap();

        let msg = s.restore_fails(&s.dir.join(&format!("restore-{what}")), &[]);
        let rel = object.strip_prefix(&data).unwrap().to_string_lossy().trim_end_matches(".zst").to_owned();
        assert!(msg.contains(&rel), "a restore from a {what} object should name it ({rel}): {msg}");
        std::fs::write(object, &original).unwrap();
    }
    // The small files' bundle, which a restore reads once for a batch of
    // files: damaged, it still fails the restore, naming the bundle.
    let bundle = std::fs::read_dir(data.parent().unwrap().join("bundle")).unwrap().next().unwrap().unwrap().path();
    for (what, damage) in damages {
        let original = std::fs::read(&bundle).unwrap();
        let mut bytes = original.clone();
        damage(&mut bytes);
        std::fs::write(&bundle, &bytes).unwrap();
        let msg = s.restore_fails(&s.dir.join(&format!("restore-bundle-{what}")), &[]);
        assert!(msg.contains("/bundle/"), "a restore from a {what} bundle should name it: {msg}");
        std::fs::write(&bundle, &original).unwrap();
    }

    // Repaired, the same backup restores: the failures were the damage's.
    s.pk.ok(&["restore", "--pg-data", s.dir.join("restore-repaired").to_str().unwrap()]);
}

#[test]
fn archive_get_exits_255_on_a_corrupted_segment_and_1_on_a_missing_one() {
    let s = Stanza::created("bad-damaged-wal");
    let (seg, original) = s.archived_segment();
    let dest = s.dir.join("RECOVERYXLOG");

    for missing in ["000000010000001000000000", "00000002.history"] {
        let (code, _) = s.pk.fails_code(&["archive-get", missing, dest.to_str().unwrap()]);
        assert_eq!(code, 1, "archive-get of {missing}, which the archive does not have");
        assert!(!dest.exists());
    }

    s.pk.ok(&["archive-get", seg.as_str(), dest.to_str().unwrap()]);
    assert!(std::fs::read(&dest).unwrap() == original);
    std::fs::remove_file(&dest).unwrap();

    let objects = s.wal_objects(&seg);
    assert_eq!(objects.len(), 1);
    let object = s.repo.join("demo/archive").join(&objects[0]);
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();

    let (code, msg) = s.pk.fails_code(&["archive-get", seg.as_str(), dest.to_str().unwrap()]);
    assert_eq!(code, 255, "a corrupted segment must stop recovery, not look missing: {msg}");
    assert!(!dest.exists(), "archive-get wrote a corrupted segment to {}", dest.display());
}

/// A store nobody answers on (a closed port): archive-get must stop
/// recovery (exit 255), never report "not found"; archive-push must fail so
/// PostgreSQL keeps the segment and retries. Both within the retry limit.
#[test]
fn a_store_that_does_not_answer_stops_recovery_and_fails_the_push() {
    let dir = TestDir::new("bad-store-down");
    let closed = free_port();
    let repo = Repo::S3 { endpoint: format!("http://127.0.0.1:{closed}"), bucket: "gone".into(), prefix: "x".into() };
    let pk = config_without_server(&dir, &repo);
    let dest = dir.join("RECOVERYXLOG");
    let (code, msg) = pk.fails_code(&["archive-get", "000000010000000000000001", dest.to_str().unwrap()]);
    assert_eq!(code, 255, "an unreachable store must stop recovery: {msg}");
    assert!(msg.contains("127.0.0.1") || msg.contains("cannot read"), "the message should say what failed: {msg}");
    assert!(!dest.exists());

    let seg = wal_file(&dir, "wal", "000000010000000000000001", &[0u8; 16 << 20]);
    let (code, msg) = pk.fails_code(&["archive-push", seg.to_str().unwrap()]);
    assert_ne!(code, 0, "{msg}");
}

// ---------------------------------------------------------------- restore refusals

#[test]
fn restore_refuses_targets_outside_the_archive() {
    let (s, _) = Stanza::backed_up("bad-targets");
    s.restore_fails(&s.dir.join("before-first-backup"), &["--target-time", "2000-01-01 00:00:00+00"]);
    s.restore_fails(&s.dir.join("after-the-archive"), &["--target-lsn", "FF/0"]);
    // The same restore without the impossible target works.
    s.pk.ok(&["restore", "--pg-data", s.dir.join("no-target").to_str().unwrap()]);
}

#[test]
fn restore_refuses_a_non_empty_directory_and_a_running_cluster() {
    let (s, _) = Stanza::backed_up("bad-restore-dir");

    let busy = s.dir.mkdir("busy");
    std::fs::write(busy.join("keep-me"), "precious").unwrap();
    let repo_before = snapshot(&s.repo);
    s.pk.fails(&["restore", "--pg-data", busy.to_str().unwrap()]);
    assert!(snapshot(&busy) == BTreeMap::from([(PathBuf::from("keep-me"), b"precious".to_vec())]), "restore touched a non-empty directory");

    // Over the running source, even with --force.
    let data = s.pg.addr.data.to_str().unwrap();
    s.pk.fails(&["restore", "--pg-data", data]);
    s.pk.fails(&["restore", "--pg-data", data, "--force"]);
    assert!(!s.pg.addr.data.join("recovery.signal").exists(), "restore wrote into a running cluster");
    assert_eq!(s.pg.count("t"), 50_000, "the running cluster must be intact");
    assert!(snapshot(&s.repo) == repo_before, "failed restores changed the repository");
}
