//! Client-side encryption: with a passphrase, nothing the repository holds
//! shows the data (WAL, backup files, manifests); backup, archive and PITR
//! restore round-trip; a wrong or missing passphrase is a one-line error,
//! and archive-get with a wrong key stops recovery (exit 255).

mod support;

use std::os::unix::fs::PermissionsExt;

use support::*;

const MARKER: &str = "TOPSECRET-pgkeep-marker";

#[test]
fn encrypted_repository_round_trips_and_shows_nothing() {
    let dir = TestDir::new("encryption");
    let repo = dir.mkdir("repo");
    let pass_file = |name: &str, pass: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{pass}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    };
    let good = pass_file("pass", "9f2c3bde0c1a4e7fb8a1d6e2c5f04b7a-long-random-passphrase");
    let pk = Pgkeep::new(&dir, "demo", "demo");
    let pg = Cluster::new(&dir, "demo-data", Some(&pk));
    let config = |pass: Option<&std::path::Path>| {
        let mut text = format!(
            "[stanza.demo]\npg-data = \"{}\"\npg-host = \"{}\"\npg-port = {}\n\n[[repo]]\nlocation = \"{}\"\ncompress = \"none\"\n",
            pg.addr.data.display(),
            pg.addr.socket_dir.display(),
            pg.addr.port,
            repo.display()
        );
        if let Some(p) = pass {
            text.push_str(&format!("cipher-pass-file = \"{}\"\n", p.display()));
        }
        text
    };
    pk.write_raw_config(&config(Some(&good)));
    pk.ok(&["stanza-create"]);
    pk.ok(&["check"]);
    pg.psql(&format!("create table secret as select g as id, '{MARKER}' || g as v from generate_series(1, 20000) g"));
    pg.psql("checkpoint");
    let label = pk.ok(&["backup", "--type", "full"]).trim().to_owned();
    assert!(pk.ok(&["info"]).contains(&label), "info reads the encrypted manifest");
    pg.psql(&format!("insert into secret select g, '{MARKER}' || g from generate_series(20001, 30000) g"));
    let last = pg.switch_wal();
    pg.wait_archived(&last);
    let expected = pg.dump();
    assert!(expected.contains(MARKER));

    // Uncompressed, yet no stored byte shows the data or the manifest.
    let mut objects = 0;
    for (path, bytes) in snapshot(&repo) {
        let name = path.to_string_lossy();
        if name.ends_with("stanza.json") {
            continue;
        }
        objects += 1;
        assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()), "{name} shows the data in clear");
        assert!(bytes.starts_with(b"PGKE1"), "{name} is not encrypted");
    }
    assert!(objects >= 10, "only {objects} objects stored");

    let target = dir.join("restored");
    pk.ok(&["restore", "--pg-data", target.to_str().unwrap()]);
    let restored = Cluster::start_restored(&dir, &target);
    assert_same_dump("restore from an encrypted repository", &expected, &restored.dump());
    restored.amcheck();
    drop(restored);

    // Wrong and missing passphrases: one line, nothing read, nothing written.
    let before = snapshot(&repo);
    let wrong = pass_file("wrong", "not-the-passphrase-at-all");
    pk.write_raw_config(&config(Some(&wrong)));
    let msg = pk.fails(&["info"]);
    assert!(msg.contains("passphrase does not open"), "{msg}");
    let (code, msg) = pk.fails_code(&["archive-get", &last, dir.join("RECOVERYXLOG").to_str().unwrap()]);
    assert_eq!(code, 255, "a wrong key must stop recovery: {msg}");
    pk.write_raw_config(&config(None));
    let msg = pk.fails(&["backup", "--type", "full"]);
    assert!(msg.contains("encrypted"), "{msg}");
    assert!(snapshot(&repo) == before, "a refused command changed the repository");
    assert!(!dir.join("RECOVERYXLOG").exists());
}
