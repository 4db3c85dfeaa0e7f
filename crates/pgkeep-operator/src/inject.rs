//! What the injection webhook adds to a PostgreSQL pod (pure): a pod
//! labelled `pgkeep.dev/stanza: <name>` gets, as JSON Patch operations
//! (RFC 6902):
//!
//! - an init container `pgkeep-install` copying the `pgkeep` binary of the
//!   operator's image into a shared volume mounted at `/pgkeep/bin`;
//! - in the PostgreSQL container (the Stanza's `container`, default
//!   `postgres`): `-c archive_mode=on`, `archive_command` and
//!   `restore_command` calling that binary, appended to its arguments (the
//!   official image passes arguments that start with `-` to `postgres`);
//!   the config, spool, binary and socket volumes; the repositories'
//!   credentials as environment variables from their Secrets;
//! - a sidecar `pgkeep-agent` (`pgkeep agent`), sharing PGDATA (the
//!   volume the PostgreSQL container mounts there), the socket directory,
//!   the config and the spool, with the agents' token Secret;
//! - the volumes: `pgkeep-bin`, `pgkeep-spool`, `pgkeep-run` (empty
//!   directories), `pgkeep-config` (ConfigMap `<stanza>-pgkeep`),
//!   `pgkeep-token` (Secret `<stanza>-agent`), and the encryption and
//!   Google credentials Secrets when the Stanza names them.
//!
//! A pod that already has a `pgkeep-agent` container is left as it is, so
//! a pod made from an already injected template is not injected twice.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::crd::Stanza;
use crate::render::{self, CIPHER_PASS_FILE, CONFIG_FILE, DEFAULT_PG_DATA, SOCKET_DIR, SPOOL};

/// The label naming a pod's Stanza.
pub const LABEL: &str = "pgkeep.dev/stanza";
/// The sidecar's name.
pub const AGENT_CONTAINER: &str = "pgkeep-agent";
/// Where the binary is shared.
pub const BIN_DIR: &str = "/pgkeep/bin";
/// Where the agent reads its token.
pub const TOKEN_DIR: &str = "/etc/pgkeep-agent";
/// Where Google credentials are mounted.
pub const GOOGLE_DIR: &str = "/etc/pgkeep-google";
/// The official image's postgres user.
pub const POSTGRES_UID: i64 = 999;

/// The JSON Patch for `pod`, or why it cannot be injected. Empty when
/// the pod is already injected.
pub fn patch(pod: &Pod, stanza: &Stanza, image: &str) -> Result<Vec<Value>, String> {
    let spec = pod.spec.as_ref().ok_or("the pod has no spec")?;
    if spec.containers.iter().any(|c| c.name == AGENT_CONTAINER) {
        return Ok(Vec::new());
    }
    let name = stanza.name_any();
    let pg_name = stanza.spec.container.clone().unwrap_or_else(|| "postgres".into());
    let (index, pg) = spec
        .containers
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == pg_name)
        .ok_or_else(|| format!("the pod has no container '{pg_name}' (the Stanza's spec.container)"))?;
    let pg_data = stanza.spec.pg_data.clone().unwrap_or_else(|| DEFAULT_PG_DATA.into());
    // The volume that holds PGDATA: the one mounted at it or above it.
    let data_mount = pg
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| pg_data == m.mount_path || pg_data.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))
        .max_by_key(|m| m.mount_path.len())
        .ok_or_else(|| format!("container '{pg_name}' mounts no volume at or above PGDATA {pg_data} (the Stanza's spec.pgData)"))?;
    let socket_mounted = pg.volume_mounts.iter().flatten().find(|m| m.mount_path == SOCKET_DIR).map(|m| m.name.clone());

    let port = stanza.spec.agent.as_ref().and_then(|a| a.port).unwrap_or(crate::pods::DEFAULT_AGENT_PORT);
    let pgkeep = format!("{BIN_DIR}/pgkeep --config {CONFIG_FILE} --stanza {name}");
    let mut env = credential_env(stanza);
    let mut ops = Vec::new();
    let c = format!("/spec/containers/{index}");

    // PostgreSQL: archive and restore through pgkeep.
    let args = [
        "-c".to_owned(),
        "archive_mode=on".to_owned(),
        "-c".to_owned(),
        format!("archive_command={pgkeep} archive-push %p"),
        "-c".to_owned(),
        format!("restore_command={pgkeep} archive-get %f \"%p\""),
    ];
    match &pg.args {
        Some(existing) if !existing.is_empty() => {
            ops.extend(args.iter().map(|a| json!({"op": "add", "path": format!("{c}/args/-"), "value": a})))
        }
        _ => ops.push(json!({"op": "add", "path": format!("{c}/args"), "value": args})),
    }
    let mut pg_mounts = vec![
        json!({"name": "pgkeep-bin", "mountPath": BIN_DIR, "readOnly": true}),
        json!({"name": "pgkeep-spool", "mountPath": SPOOL}),
        json!({"name": "pgkeep-config", "mountPath": "/etc/pgkeep", "readOnly": true}),
    ];
    let socket_volume = match socket_mounted {
        Some(v) => v,
        None => {
            pg_mounts.push(json!({"name": "pgkeep-run", "mountPath": SOCKET_DIR}));
            "pgkeep-run".to_owned()
        }
    };
    let (secret_volumes, secret_mounts) = secret_volumes(stanza);
    pg_mounts.extend(secret_mounts.iter().cloned());
    add_all(&mut ops, &format!("{c}/volumeMounts"), pg.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()), pg_mounts);
    add_all(&mut ops, &format!("{c}/env"), pg.env.as_ref().is_some_and(|v| !v.is_empty()), env.clone());

    // The init container.
    let init = json!({
        "name": "pgkeep-install", "image": image,
        "command": ["cp", "/usr/local/bin/pgkeep", format!("{BIN_DIR}/pgkeep")],
        "volumeMounts": [{"name": "pgkeep-bin", "mountPath": BIN_DIR}],
        "securityContext": {"allowPrivilegeEscalation": false, "runAsUser": POSTGRES_UID, "runAsGroup": POSTGRES_UID},
    });
    add_all(&mut ops, "/spec/initContainers", spec.init_containers.as_ref().is_some_and(|v| !v.is_empty()), vec![init]);

    // The agent.
    env.push(json!({"name": "PGKEEP_AGENT_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}));
    env.push(json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}));
    let mut agent_mounts = vec![
        json!({"name": data_mount.name, "mountPath": data_mount.mount_path}),
        json!({"name": socket_volume, "mountPath": SOCKET_DIR}),
        json!({"name": "pgkeep-spool", "mountPath": SPOOL}),
        json!({"name": "pgkeep-config", "mountPath": "/etc/pgkeep", "readOnly": true}),
        json!({"name": "pgkeep-token", "mountPath": TOKEN_DIR, "readOnly": true}),
    ];
    agent_mounts.extend(secret_mounts);
    let agent = json!({
        "name": AGENT_CONTAINER, "image": image,
        "command": ["/usr/local/bin/pgkeep", "--config", CONFIG_FILE, "--stanza", name, "agent", "--listen", format!("0.0.0.0:{port}")],
        "env": env,
        "ports": [{"name": "pgkeep-agent", "containerPort": port}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 20},
        "securityContext": {"runAsUser": POSTGRES_UID, "runAsGroup": POSTGRES_UID, "allowPrivilegeEscalation": false},
        "volumeMounts": agent_mounts,
    });
    ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": agent}));

    // The volumes.
    let mut volumes = vec![
        json!({"name": "pgkeep-bin", "emptyDir": {}}),
        json!({"name": "pgkeep-spool", "emptyDir": {}}),
        json!({"name": "pgkeep-config", "configMap": {"name": render::configmap_name(stanza)}}),
        json!({"name": "pgkeep-token", "secret": {"secretName": crate::pods::token_secret_name(stanza)}}),
    ];
    if socket_volume == "pgkeep-run" {
        volumes.push(json!({"name": "pgkeep-run", "emptyDir": {}}));
    }
    volumes.extend(secret_volumes);
    add_all(&mut ops, "/spec/volumes", spec.volumes.as_ref().is_some_and(|v| !v.is_empty()), volumes);
    Ok(ops)
}

/// Adds `items` to the array at `path`: one `add .../-` each when it
/// exists, else one `add` of the whole array.
pub(crate) fn add_all(ops: &mut Vec<Value>, path: &str, exists: bool, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    if exists {
        ops.extend(items.into_iter().map(|v| json!({"op": "add", "path": format!("{path}/-"), "value": v})));
    } else {
        ops.push(json!({"op": "add", "path": path, "value": items}));
    }
}

/// The object stores' credentials, as the variables the engine reads,
/// from the Secrets the Stanza names (the first repository of each kind
/// that names any); PGPASSWORD from the Stanza's `credentials`.
pub(crate) fn credential_env(stanza: &Stanza) -> Vec<Value> {
    let from =
        |var: &str, s: &crate::crd::SecretKeySelector| json!({"name": var, "valueFrom": {"secretKeyRef": {"name": s.name, "key": s.key}}});
    let mut env = Vec::new();
    let repos = &stanza.spec.repositories;
    if let Some(s3) = repos.iter().find_map(|r| r.s3_credentials.as_ref()) {
        env.push(from("AWS_ACCESS_KEY_ID", &s3.access_key_id));
        env.push(from("AWS_SECRET_ACCESS_KEY", &s3.secret_access_key));
    }
    if let Some(az) = repos.iter().find_map(|r| r.azure_credentials.as_ref()) {
        env.push(from("AZURE_STORAGE_ACCOUNT_NAME", &az.storage_account));
        env.push(from("AZURE_STORAGE_ACCOUNT_KEY", &az.storage_key));
    }
    if repos.iter().any(|r| r.google_credentials.is_some()) {
        env.push(json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": format!("{GOOGLE_DIR}/credentials.json")}));
    }
    if let Some(c) = &stanza.spec.credentials {
        env.push(json!({"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": c.name, "key": "password"}}}));
    }
    env
}

/// Every Secret the injected containers read, with the key when one is
/// named: the repositories' credentials, the encryption passphrase, the
/// database credentials.
pub(crate) fn referenced_secrets(stanza: &Stanza) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut add = |s: &crate::crd::SecretKeySelector| out.push((s.name.clone(), Some(s.key.clone())));
    for r in &stanza.spec.repositories {
        if let Some(c) = &r.s3_credentials {
            add(&c.access_key_id);
            add(&c.secret_access_key);
        }
        if let Some(c) = &r.azure_credentials {
            add(&c.storage_account);
            add(&c.storage_key);
        }
        if let Some(c) = &r.google_credentials {
            add(&c.application_credentials);
        }
    }
    if let Some(e) = &stanza.spec.encryption {
        add(e);
    }
    if let Some(c) = &stanza.spec.credentials {
        out.push((c.name.clone(), Some("password".into())));
    }
    out
}

/// The volumes and mounts of the encryption passphrase and the Google
/// credentials.
pub(crate) fn secret_volumes(stanza: &Stanza) -> (Vec<Value>, Vec<Value>) {
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    if let Some(e) = &stanza.spec.encryption {
        let dir = std::path::Path::new(CIPHER_PASS_FILE).parent().unwrap().display().to_string();
        volumes.push(json!({"name": "pgkeep-cipher", "secret": {"secretName": e.name, "items": [{"key": e.key, "path": "pass"}]}}));
        mounts.push(json!({"name": "pgkeep-cipher", "mountPath": dir, "readOnly": true}));
    }
    if let Some(g) = stanza.spec.repositories.iter().find_map(|r| r.google_credentials.as_ref()) {
        let s = &g.application_credentials;
        volumes.push(
            json!({"name": "pgkeep-google", "secret": {"secretName": s.name, "items": [{"key": s.key, "path": "credentials.json"}]}}),
        );
        mounts.push(json!({"name": "pgkeep-google", "mountPath": GOOGLE_DIR, "readOnly": true}));
    }
    (volumes, mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(extra: Value) -> Stanza {
        let mut spec = json!({
            "selector": {"matchLabels": {"app": "postgres"}},
            "repositories": [{"destinationPath": "s3://b/p",
                "s3Credentials": {"accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"}}}],
        });
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(
            json!({"apiVersion": "pgkeep.dev/v1alpha1", "kind": "Stanza", "metadata": {"name": "main", "namespace": "db"}, "spec": spec}),
        )
        .unwrap()
    }

    fn pod(containers: Value, volumes: Value) -> Pod {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pg-0", "labels": {LABEL: "main"}},
            "spec": {"containers": containers, "volumes": volumes}}))
        .unwrap()
    }

    /// Applies the patch as the API server does (for the ops it uses:
    /// add to an object member or to the end of an array).
    fn apply(mut doc: Value, ops: &[Value]) -> Value {
        for op in ops {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let (last, parents) = parts.split_last().unwrap();
            let mut cur = &mut doc;
            for p in parents {
                cur = match cur {
                    Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
                    Value::Object(o) => o.get_mut(*p).unwrap_or_else(|| panic!("{path}: no {p}")),
                    _ => panic!("{path}"),
                };
            }
            match (cur, *last) {
                (Value::Array(a), "-") => a.push(op["value"].clone()),
                (Value::Object(o), key) => {
                    assert!(!o.contains_key(key), "{path} would replace an existing member");
                    o.insert(key.to_owned(), op["value"].clone());
                }
                (_, _) => panic!("{path}"),
            }
        }
        doc
    }

    #[test]
    fn an_official_image_pod_gets_the_binary_the_archive_settings_and_the_agent() {
        let p = pod(
            json!([{"name": "postgres", "image": "postgres:17", "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]}]),
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data-pg-0"}}]),
        );
        let ops = patch(&p, &stanza(json!({})), "ghcr.io/pgkeep/pgkeep:0.1.0").unwrap();
        let out = apply(serde_json::to_value(&p).unwrap(), &ops);
        // The result is a valid Pod again.
        let injected: Pod = serde_json::from_value(out.clone()).unwrap();
        let spec = injected.spec.unwrap();
        let pg = &spec.containers[0];
        let args = pg.args.clone().unwrap().join(" ");
        assert!(args.contains("archive_mode=on"), "{args}");
        assert!(
            args.contains("archive_command=/pgkeep/bin/pgkeep --config /etc/pgkeep/pgkeep.toml --stanza main archive-push %p"),
            "{args}"
        );
        assert!(args.contains("restore_command=/pgkeep/bin/pgkeep --config /etc/pgkeep/pgkeep.toml --stanza main archive-get %f \"%p\""));
        let env: Vec<String> = pg.env.clone().unwrap().iter().map(|e| e.name.clone()).collect();
        assert_eq!(env, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);
        let agent = spec.containers.iter().find(|c| c.name == AGENT_CONTAINER).unwrap();
        let mounts: Vec<(String, String)> = agent.volume_mounts.clone().unwrap().into_iter().map(|m| (m.name, m.mount_path)).collect();
        // PGDATA and the socket directory shared with PostgreSQL.
        assert!(mounts.contains(&("data".into(), "/var/lib/postgresql/data".into())), "{mounts:?}");
        assert!(mounts.contains(&("pgkeep-run".into(), SOCKET_DIR.into())), "{mounts:?}");
        assert!(pg.volume_mounts.clone().unwrap().iter().any(|m| m.name == "pgkeep-run" && m.mount_path == SOCKET_DIR));
        assert_eq!(spec.init_containers.unwrap()[0].name, "pgkeep-install");
        let volumes: Vec<String> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(volumes, ["data", "pgkeep-bin", "pgkeep-spool", "pgkeep-config", "pgkeep-token", "pgkeep-run"]);
        // Injecting the injected pod changes nothing.
        assert!(patch(&serde_json::from_value(out).unwrap(), &stanza(json!({})), "x").unwrap().is_empty());
    }

    #[test]
    fn existing_arguments_env_mounts_and_socket_volumes_are_kept() {
        let p = pod(
            json!([{"name": "db", "image": "postgres:17", "args": ["-c", "shared_buffers=1GB"], "env": [{"name": "X", "value": "1"}],
                    "volumeMounts": [{"name": "pgdata", "mountPath": "/data"}, {"name": "sock", "mountPath": SOCKET_DIR}]}]),
            json!([{"name": "pgdata", "emptyDir": {}}, {"name": "sock", "emptyDir": {}}]),
        );
        let s = stanza(json!({"container": "db", "pgData": "/data/pgdata", "encryption": {"name": "pass", "key": "p"},
            "credentials": {"name": "pg-creds"}}));
        let out = apply(serde_json::to_value(&p).unwrap(), &patch(&p, &s, "img").unwrap());
        let injected: Pod = serde_json::from_value(out).unwrap();
        let spec = injected.spec.unwrap();
        let pg = &spec.containers[0];
        assert_eq!(&pg.args.clone().unwrap()[..2], ["-c", "shared_buffers=1GB"]);
        assert_eq!(pg.env.clone().unwrap()[0].name, "X");
        let agent = &spec.containers[1];
        let mounts: Vec<(String, String)> = agent.volume_mounts.clone().unwrap().into_iter().map(|m| (m.name, m.mount_path)).collect();
        // The volume above PGDATA, and the pod's own socket volume.
        assert!(mounts.contains(&("pgdata".into(), "/data".into())), "{mounts:?}");
        assert!(mounts.contains(&("sock".into(), SOCKET_DIR.into())), "{mounts:?}");
        assert!(mounts.contains(&("pgkeep-cipher".into(), "/etc/pgkeep-cipher".into())), "{mounts:?}");
        assert!(agent.env.clone().unwrap().iter().any(|e| e.name == "PGPASSWORD"));
        assert!(!spec.volumes.unwrap().iter().any(|v| v.name == "pgkeep-run"));
    }

    #[test]
    fn a_pod_without_the_container_or_a_pgdata_volume_is_refused_saying_which_field() {
        let p = pod(json!([{"name": "app", "image": "x"}]), json!([]));
        assert!(patch(&p, &stanza(json!({})), "img").unwrap_err().contains("no container 'postgres' (the Stanza's spec.container)"));
        let p = pod(json!([{"name": "postgres", "image": "x"}]), json!([]));
        assert!(patch(&p, &stanza(json!({})), "img").unwrap_err().contains("spec.pgData"));
    }
}
