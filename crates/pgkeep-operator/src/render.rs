//! The pgkeep config file a Stanza stands for (pure), which the operator
//! keeps in the ConfigMap `<stanza>-pgkeep` (key `pgkeep.toml`) for the
//! pods to mount at `/etc/pgkeep/pgkeep.toml`: `archive_command`,
//! `restore_command` and the agent all read it.
//!
//! Secrets never enter it: S3 keys come from `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`, Azure's from `AZURE_STORAGE_ACCOUNT_NAME` and
//! `AZURE_STORAGE_ACCOUNT_KEY`, GCS's from
//! `GOOGLE_APPLICATION_CREDENTIALS` (the variables the engine's object
//! store clients read), set in the pod from the Secrets the Stanza names;
//! the encryption passphrase is a file, mounted from its Secret at
//! [`CIPHER_PASS_FILE`].

use std::fmt::Write;

use kube::ResourceExt;

use crate::crd::{Compression, Stanza};

/// Where the pods mount the config file.
pub const CONFIG_FILE: &str = "/etc/pgkeep/pgkeep.toml";
/// Where the pods mount the encryption passphrase.
pub const CIPHER_PASS_FILE: &str = "/etc/pgkeep-cipher/pass";
/// The socket directory of the official `postgres` image.
pub const SOCKET_DIR: &str = "/var/run/postgresql";
/// The official image's PGDATA.
pub const DEFAULT_PG_DATA: &str = "/var/lib/postgresql/data";
/// The spool of asynchronous archiving, on a volume of the pod.
pub const SPOOL: &str = "/pgkeep/spool";

/// The name of the ConfigMap.
pub fn configmap_name(stanza: &Stanza) -> String {
    format!("{}-pgkeep", stanza.name_any())
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string encodes")
}

/// The TOML text.
pub fn config_toml(stanza: &Stanza) -> String {
    let s = &stanza.spec;
    let mut t = String::new();
    let _ = writeln!(t, "# Written by pgkeep-operator from Stanza {}: edits are overwritten.", stanza.name_any());
    let _ = writeln!(t, "[stanza.{}]", quote(&stanza.name_any()));
    let _ = writeln!(t, "pg-data = {}", quote(s.pg_data.as_deref().unwrap_or(DEFAULT_PG_DATA)));
    let _ = writeln!(t, "pg-host = {}", quote(SOCKET_DIR));
    let _ = writeln!(t, "pg-port = {}", s.pg_port.unwrap_or(5432));
    let _ = writeln!(t, "spool-path = {}", quote(SPOOL));
    for r in &s.repositories {
        let _ = writeln!(t, "\n[[repo]]");
        let _ = writeln!(t, "location = {}", quote(&r.destination_path));
        if let Some(e) = &r.endpoint_url {
            let _ = writeln!(t, "endpoint = {}", quote(e));
        }
        if let Some(region) = &r.region {
            let _ = writeln!(t, "region = {}", quote(region));
        }
        if let Some(p) = r.path_style {
            let _ = writeln!(t, "path-style = {p}");
        }
        let compress = match s.compression.unwrap_or(Compression::Zstd) {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        };
        let _ = writeln!(t, "compress = \"{compress}\"");
        if let Some(ret) = &s.retention {
            if let Some(n) = ret.full_backups {
                let _ = writeln!(t, "retention-full = {n}");
            }
            if let Some(n) = ret.diff_backups {
                let _ = writeln!(t, "retention-diff = {n}");
            }
            if let Some(w) = &ret.recovery_window {
                let _ = writeln!(t, "retention-window = {}", quote(w));
            }
        }
        if s.encryption.is_some() {
            let _ = writeln!(t, "cipher-pass-file = {}", quote(CIPHER_PASS_FILE));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_config_is_what_the_engine_parses() {
        let stanza: Stanza = serde_json::from_value(serde_json::json!({
            "apiVersion": "pgkeep.dev/v1alpha1", "kind": "Stanza",
            "metadata": {"name": "main", "namespace": "db"},
            "spec": {
                "selector": {"matchLabels": {"app": "postgres"}},
                "repositories": [
                    {"destinationPath": "/backups"},
                    {"destinationPath": "s3://bucket/db", "endpointURL": "http://minio:9000", "region": "eu-west-1", "pathStyle": true,
                     "s3Credentials": {"accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"}}}
                ],
                "compression": "lz4",
                "encryption": {"name": "pass", "key": "pass"},
                "retention": {"fullBackups": 2, "recoveryWindow": "14d"}
            }
        }))
        .unwrap();
        let text = config_toml(&stanza);
        let file = pgkeep_core::config::ConfigFile::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let st = &file.stanza["main"];
        assert_eq!(st.pg_data.as_deref(), Some(std::path::Path::new(DEFAULT_PG_DATA)));
        assert_eq!((st.pg_host.as_deref(), st.pg_port), (Some(SOCKET_DIR), Some(5432)));
        assert_eq!(file.repo.len(), 2);
        assert_eq!(file.repo[1].location.as_deref(), Some("s3://bucket/db"));
        assert_eq!(file.repo[1].endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(file.repo[1].path_style, Some(true));
        assert_eq!(file.repo[0].retention_full, Some(2));
        assert_eq!(file.repo[1].retention_window.as_deref(), Some("14d"));
        assert_eq!(file.repo[0].cipher_pass_file.as_deref(), Some(std::path::Path::new(CIPHER_PASS_FILE)));
        // No secret reaches the file.
        assert!(!text.contains("secret") && !text.contains("access-key"), "{text}");
    }
}
