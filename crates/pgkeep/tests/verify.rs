//! `verify`: a clean repository verifies; one byte flipped in any stored
//! object (backup files, bundles, manifests, WAL, the stanza file) is
//! found, and restore refuses the damaged backup; a missing WAL segment is
//! reported as a gap with its range.

mod support;

use std::path::PathBuf;

use support::*;

fn flip(path: &PathBuf) -> Vec<u8> {
    let original = std::fs::read(path).unwrap();
    let mut bad = original.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x20;
    std::fs::write(path, &bad).unwrap();
    original
}

#[test]
fn verify_finds_a_flipped_byte_in_any_object_and_gaps_in_the_archive() {
    let (dir, repo, pg, pk) = local_stanza("verify");
    pg.pgbench_init(1);
    pk.ok(&["backup", "--type", "full"]);
    pg.pgbench(2, 2);
    let incr = pk.ok(&["backup", "--type", "incr"]).trim().to_owned();

    let out = pk.ok(&["verify"]);
    assert!(out.contains("2 backups") && out.contains("all good"), "{out}");

    // Every object of the repository, one at a time.
    let root = repo.path().join("demo");
    let objects: Vec<PathBuf> = snapshot(&root).into_keys().map(|p| root.join(p)).collect();
    assert!(objects.len() > 20, "{} objects", objects.len());
    let mut harmless = Vec::new();
    for path in &objects {
        let rel = path.strip_prefix(&root).unwrap().to_str().unwrap().to_owned();
        let original = flip(path);
        let r = pk.run(&["verify"]);
        // In repetitive data a flipped bit of a zstd match offset can point
        // at identical bytes: the object still decodes to what was stored,
        // and restores right. Only such a flip may pass verify.
        if r.status.success() && rel.ends_with(".zst") && !rel.contains("/bundle/") {
            let damaged = zstd::decode_all(&std::fs::read(path).unwrap()[..]);
            if damaged.is_ok_and(|d| d == zstd::decode_all(&original[..]).unwrap()) {
                harmless.push(rel);
                std::fs::write(path, original).unwrap();
                continue;
            }
        }
        assert!(!r.status.success(), "verify missed a flipped byte in {rel}:\n{}", r.stdout);
        let name = rel.rsplit('/').next().unwrap();
        let named = r.stdout.contains(name) || r.stderr.contains(name) || r.stdout.contains(&rel) || r.stderr.contains(&rel);
        assert!(named, "verify should name {rel}:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        std::fs::write(path, original).unwrap();
    }
    assert!(harmless.len() <= 1, "flips that left the decoded bytes as they were: {harmless:?}");
    assert!(pk.ok(&["verify"]).contains("all good"));

    // Restore refuses a damaged backup file and a damaged bundle.
    let backup_dir = root.join("backup").join(&incr);
    let own = files_by_size(&backup_dir.join("pg_data"), ".zst").into_iter().next().expect("an object of its own");
    let bundle = snapshot(&backup_dir.join("bundle")).into_keys().next().map(|p| backup_dir.join("bundle").join(p)).expect("a bundle");
    for path in [own, bundle] {
        let original = flip(&path);
        let target = dir.join("restored");
        let msg = pk.fails(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &incr, "--target-immediate"]);
        assert!(msg.contains("corrupt") || msg.contains("checksum"), "{msg}");
        assert_absent_or_empty(&target);
        std::fs::write(&path, original).unwrap();
    }

    // A segment removed from the middle of the archive is a gap.
    let archive = root.join("archive");
    let mut segments: Vec<PathBuf> = snapshot(&archive)
        .into_keys()
        .filter(|p| p.file_name().unwrap().to_str().unwrap().split('-').next().unwrap().len() == 24)
        .collect();
    segments.sort();
    let middle = archive.join(&segments[segments.len() / 2]);
    let name = middle.file_name().unwrap().to_str().unwrap()[..24].to_owned();
    std::fs::remove_file(&middle).unwrap();
    let r = pk.run(&["verify", "--output", "json"]);
    assert!(!r.status.success());
    let reports: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // Without --repo: one report per repository.
    let report = &reports[0];
    assert_eq!(reports.as_array().map(Vec::len), Some(1), "{reports}");
    let gaps = report["wal"]["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{report}");
    assert_eq!((gaps[0]["from"].as_str().unwrap(), gaps[0]["to"].as_str().unwrap()), (name.as_str(), name.as_str()));
}

/// An uncompressed repository bundles an empty file as zero bytes at some
/// offset of a bundle: reading that empty range must give an empty file,
/// not an error from the store ("Range started at N and ended at N").
#[test]
fn an_uncompressed_repository_with_empty_files_verifies_and_restores() {
    let (dir, repo, pg, pk) = local_stanza("verify-none");
    pg.psql("create table empty_one (a int)");
    pg.psql("create table some_rows as select g from generate_series(1, 1000) g");
    let expected = pg.dump();
    let label = pk.ok(&["backup", "--type", "full", "--compress", "none"]).trim().to_owned();
    let manifest = read_manifest(&repo, &label);
    let empty_bundled = manifest["files"].as_array().unwrap().iter().filter(|f| f["size"] == 0 && !f["offset"].is_null()).count();
    assert!(empty_bundled > 0, "no empty file was bundled: nothing to check");
    let out = pk.ok(&["verify"]);
    assert!(out.contains("all good"), "{out}");
    let target = dir.join("restored");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap(), "--set", &label, "--target-immediate"]);
    let restored = Cluster::start_restored(&dir, &target);
    assert_same_dump("restore of an uncompressed backup", &expected, &restored.dump());
}
