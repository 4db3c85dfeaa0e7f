//! What the CloudNativePG plugin adds to the Pods and recovery Jobs that
//! CloudNativePG creates (pure; CNPG-I's `OperatorLifecycle` answers it as
//! a JSON Patch, RFC 6902):
//!
//! - a native sidecar (an init container with `restartPolicy: Always`)
//!   `plugin-pgkeep` running `pgkeep agent --plugin-socket
//!   /plugins/pgkeep.dev`, with every volume PostgreSQL's container
//!   mounts (PGDATA, `/controller` with the server's socket, the WAL
//!   volume), its environment, and the repositories' credentials;
//! - the `plugins` volume at `/plugins` in PostgreSQL's container too (the
//!   instance manager finds the socket there);
//! - each Stanza's ConfigMap (`<stanza>-pgkeep`, written by the Stanza
//!   controller), projected into `/etc/pgkeep-stanzas/<stanza>.toml`;
//!   a recovery reads one stanza and archives into another;
//! - in instance Pods, the agent's HTTP API too (the Stanza's token Secret),
//!   so that the Stanza's status, `Backup`s of pgkeep and the metrics work
//!   as for any other pod; a recovery Job serves only the socket.
//!
//! CloudNativePG calls `EVALUATE` on the Pod it would create now (never on
//! the live one) and compares the result with what the running Pod was
//! made from: the patch must depend only on the Cluster, the Stanza and the
//! image, or every change elsewhere would roll the pods. A spec that
//! already has the sidecar is left as it is.

use serde_json::{json, Value};

use crate::crd::Stanza;
use crate::inject::{add_all, credential_env, secret_volumes, TOKEN_DIR};
use kube::ResourceExt;

/// The sidecar's name.
pub const SIDECAR: &str = "plugin-pgkeep";
/// Where each Stanza's config is projected.
pub const STANZAS_DIR: &str = "/etc/pgkeep-stanzas";
/// CloudNativePG's PGDATA (`pkg/specs`: `PgDataPath`).
pub const CNPG_PG_DATA: &str = "/var/lib/postgresql/data/pgdata";
/// CloudNativePG's socket directory (`/controller/run`, on the scratch
/// volume that every container of the pod mounts at `/controller`).
pub const CNPG_SOCKET_DIR: &str = "/controller/run";
/// The plugin socket, as CloudNativePG looks for it.
pub const SOCKET: &str = "/plugins/pgkeep.dev";
/// Where asynchronous archiving spools.
const SPOOL: &str = "/pgkeep/spool";

/// What is being patched.
pub enum Target<'a> {
    /// An instance Pod: the cluster's own Stanza.
    Pod {
        /// The Stanza the cluster archives into.
        own: &'a Stanza,
    },
    /// A recovery Job (its main container is named after its role).
    RecoveryJob {
        /// The Stanza recovered from.
        source: &'a Stanza,
        /// The Stanza the new cluster will archive into, when it names one.
        own: Option<&'a Stanza>,
        /// The main container's name (`full-recovery`).
        container: &'a str,
    },
}

/// The JSON Patch for the pod spec at `base` (`/spec` for a Pod,
/// `/spec/template/spec` for a Job) of `object`, or why it cannot be
/// made. Empty when the sidecar is there already.
pub fn patch(object: &Value, base: &str, target: &Target<'_>, image: &str) -> Result<Vec<Value>, String> {
    let spec = object.pointer(base).ok_or_else(|| format!("the object has no {base}"))?;
    let inits = spec.get("initContainers").and_then(Value::as_array);
    if inits
        .into_iter()
        .flatten()
        .chain(spec.get("containers").and_then(Value::as_array).into_iter().flatten())
        .any(|c| c["name"] == SIDECAR)
    {
        return Ok(Vec::new());
    }
    let main_name = match target {
        Target::Pod { .. } => "postgres",
        Target::RecoveryJob { container, .. } => container,
    };
    let containers = spec.get("containers").and_then(Value::as_array).ok_or("the pod spec has no containers")?;
    let (index, main) = containers
        .iter()
        .enumerate()
        .find(|(_, c)| c["name"] == main_name)
        .ok_or_else(|| format!("the pod spec has no container '{main_name}'"))?;
    let mut ops = Vec::new();
    let volumes = spec.get("volumes").and_then(Value::as_array);
    let has_volume = |name: &str| volumes.into_iter().flatten().any(|v| v["name"] == name);
    let main_mounts: Vec<Value> = main.get("volumeMounts").and_then(Value::as_array).cloned().unwrap_or_default();

    // The socket's volume, in PostgreSQL's container too.
    let mut new_volumes = Vec::new();
    if !has_volume("plugins") {
        new_volumes.push(json!({"name": "plugins", "emptyDir": {}}));
    }
    if !main_mounts.iter().any(|m| m["name"] == "plugins") {
        let path = format!("{base}/containers/{index}/volumeMounts");
        add_all(&mut ops, &path, !main_mounts.is_empty(), vec![json!({"name": "plugins", "mountPath": "/plugins"})]);
    }

    // The Stanzas' configs; the credentials are the ones of the stanza
    // whose repositories the container reads most (the source in a
    // recovery), as one process has one set of variables.
    let (stanzas, creds): (Vec<&Stanza>, &Stanza) = match target {
        Target::Pod { own } => (vec![*own], own),
        Target::RecoveryJob { source, own, .. } => {
            let mut v = vec![*source];
            v.extend(own.iter().copied().filter(|o| o.name_any() != source.name_any()));
            (v, source)
        }
    };
    let sources: Vec<Value> = stanzas
        .iter()
        .map(|s| {
            json!({"configMap": {"name": crate::render::configmap_name(s),
                "items": [{"key": "pgkeep.toml", "path": format!("{}.toml", s.name_any())}]}})
        })
        .collect();
    new_volumes.push(json!({"name": "pgkeep-stanzas", "projected": {"sources": sources}}));
    new_volumes.push(json!({"name": "pgkeep-spool", "emptyDir": {}}));
    let (secret_vols, secret_mounts) = secret_volumes(creds);
    new_volumes.extend(secret_vols);

    let mut mounts = main_mounts.clone();
    mounts.retain(|m| m["name"] != "plugins");
    mounts.push(json!({"name": "plugins", "mountPath": "/plugins"}));
    mounts.push(json!({"name": "pgkeep-stanzas", "mountPath": STANZAS_DIR, "readOnly": true}));
    mounts.push(json!({"name": "pgkeep-spool", "mountPath": SPOOL}));
    mounts.extend(secret_mounts);

    let mut env: Vec<Value> = main.get("env").and_then(Value::as_array).cloned().unwrap_or_default();
    for e in credential_env(creds) {
        env.retain(|x| x["name"] != e["name"]);
        env.push(e);
    }
    env.retain(|x| x["name"] != "PGKEEP_CONFIG" && x["name"] != "PGKEEP_STANZA");

    let first = stanzas[0].name_any();
    let mut command: Vec<String> = ["/usr/local/bin/pgkeep", "--config"].map(String::from).to_vec();
    command.push(format!("{STANZAS_DIR}/{first}.toml"));
    command
        .extend(["--pg-data", CNPG_PG_DATA, "--pg-host", CNPG_SOCKET_DIR, "--pg-port", "5432", "--pg-user", "postgres"].map(String::from));
    let mut ports = Vec::new();
    match target {
        Target::Pod { own } => {
            // The HTTP API for pgkeep's own operator, as in any injected pod.
            let port = own.spec.agent.as_ref().and_then(|a| a.port).unwrap_or(crate::pods::DEFAULT_AGENT_PORT);
            command.extend(["--stanza".to_owned(), first.clone(), "agent".to_owned(), "--listen".to_owned(), format!("0.0.0.0:{port}")]);
            command.extend(["--token-file".to_owned(), format!("{TOKEN_DIR}/token")]);
            mounts.push(json!({"name": "pgkeep-token", "mountPath": TOKEN_DIR, "readOnly": true}));
            new_volumes.push(json!({"name": "pgkeep-token", "secret": {"secretName": crate::pods::token_secret_name(own)}}));
            ports.push(json!({"name": "pgkeep-agent", "containerPort": port}));
        }
        Target::RecoveryJob { .. } => command.push("agent".to_owned()),
    }
    command.extend(["--plugin-socket", SOCKET, "--plugin-config-dir", STANZAS_DIR].map(String::from));
    let mut sidecar = json!({
        "name": SIDECAR,
        "image": image,
        "restartPolicy": "Always",
        "command": command,
        "env": env,
        "volumeMounts": mounts,
        // Ready once the socket is there: CloudNativePG's instance manager
        // connects to it as soon as PostgreSQL's container starts.
        "startupProbe": {"exec": {"command": ["test", "-S", SOCKET]}, "periodSeconds": 1, "failureThreshold": 60},
        // Requests, so that a namespace's LimitRange or quota admits the
        // pod; no CPU limit (a backup compresses as fast as it may).
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": false, "privileged": false, "runAsNonRoot": true, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
        },
    });
    if !ports.is_empty() {
        sidecar["ports"] = Value::Array(ports);
    }
    add_all(&mut ops, &format!("{base}/initContainers"), inits.is_some_and(|v| !v.is_empty()), vec![sidecar]);
    add_all(&mut ops, &format!("{base}/volumes"), volumes.is_some_and(|v| !v.is_empty()), new_volumes);
    Ok(ops)
}

/// The role of a CloudNativePG Job (its template's `cnpg.io/jobRole`
/// label), e.g. `full-recovery`.
pub fn job_role(job: &Value) -> Option<&str> {
    job.pointer("/spec/template/metadata/labels")?.as_object()?.iter().find(|(k, _)| k.ends_with("/jobRole")).and_then(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn stanza(name: &str) -> Stanza {
        serde_json::from_value(json!({"apiVersion": "pgkeep.dev/v1alpha1", "kind": "Stanza",
            "metadata": {"name": name, "namespace": "db"},
            "spec": {"selector": {"matchLabels": {"cnpg.io/cluster": "pg"}},
                "repositories": [{"destinationPath": "s3://b/p",
                    "s3Credentials": {"accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"}}}]}}))
        .unwrap()
    }

    fn apply(doc: &Value, ops: &[Value]) -> Value {
        let mut doc = doc.clone();
        for op in ops {
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let target = doc.pointer_mut(parent).unwrap();
            match (target, last) {
                (Value::Array(a), "-") => a.push(op["value"].clone()),
                (Value::Object(o), key) => {
                    o.insert(key.to_owned(), op["value"].clone());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        doc
    }

    #[test]
    fn a_pod_gets_the_sidecar_with_postgres_volumes_and_env_once() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pg-1"}, "spec": {
            "containers": [{"name": "postgres", "image": "pg", "env": [{"name": "PGDATA", "value": CNPG_PG_DATA}, {"name": "POD_NAME", "value": "pg-1"}],
                "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}, {"name": "scratch-data", "mountPath": "/controller"}]}],
            "initContainers": [{"name": "bootstrap-controller", "image": "cnpg"}],
            "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": "pg-1"}}, {"name": "scratch-data", "emptyDir": {}}]}});
        let own = stanza("main");
        let ops = patch(&pod, "/spec", &Target::Pod { own: &own }, "img").unwrap();
        let out = apply(&pod, &ops);
        let side = out.pointer("/spec/initContainers/1").unwrap();
        assert_eq!((side["name"].as_str(), side["restartPolicy"].as_str()), (Some(SIDECAR), Some("Always")));
        let cmd: Vec<&str> = side["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(cmd.windows(2).any(|w| w == ["--plugin-socket", SOCKET]), "{cmd:?}");
        assert!(cmd.windows(2).any(|w| w == ["--config", "/etc/pgkeep-stanzas/main.toml"]), "{cmd:?}");
        assert!(cmd.contains(&"--token-file"), "a pod serves pgkeep's operator too: {cmd:?}");
        let mounts: Vec<&str> = side["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
        for m in ["/var/lib/postgresql/data", "/controller", "/plugins", STANZAS_DIR] {
            assert!(mounts.contains(&m), "{m} not in {mounts:?}");
        }
        let env: Vec<&str> = side["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(env.contains(&"POD_NAME") && env.contains(&"AWS_ACCESS_KEY_ID"), "{env:?}");
        let pg_mounts = out.pointer("/spec/containers/0/volumeMounts").unwrap().as_array().unwrap();
        assert!(pg_mounts.iter().any(|m| m["mountPath"] == "/plugins"));
        let vols: Vec<&str> = out["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert!(vols.contains(&"plugins") && vols.contains(&"pgkeep-stanzas") && vols.contains(&"pgkeep-token"), "{vols:?}");
        // Once is enough.
        assert!(patch(&out, "/spec", &Target::Pod { own: &own }, "img").unwrap().is_empty());
        // No postgres container: said, not guessed.
        let bad = json!({"spec": {"containers": [{"name": "other"}]}});
        assert_eq!(patch(&bad, "/spec", &Target::Pod { own: &own }, "img").unwrap_err(), "the pod spec has no container 'postgres'");
    }

    #[test]
    fn a_recovery_job_gets_both_stanzas_and_only_the_socket() {
        let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "pg-1-full-recovery"}, "spec": {"template": {
            "metadata": {"labels": {"cnpg.io/jobRole": "full-recovery"}},
            "spec": {"containers": [{"name": "full-recovery", "image": "pg",
                "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}]}],
                "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": "pg-1"}}]}}}});
        assert_eq!(job_role(&job), Some("full-recovery"));
        let (source, own) = (stanza("old"), stanza("new"));
        let ops = patch(
            &job,
            "/spec/template/spec",
            &Target::RecoveryJob { source: &source, own: Some(&own), container: "full-recovery" },
            "img",
        )
        .unwrap();
        let out = apply(&job, &ops);
        let side = out.pointer("/spec/template/spec/initContainers/0").unwrap();
        let cmd: Vec<&str> = side["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(!cmd.contains(&"--token-file") && cmd.contains(&"--plugin-config-dir"), "{cmd:?}");
        let vols = out.pointer("/spec/template/spec/volumes").unwrap().as_array().unwrap();
        let projected = vols.iter().find(|v| v["name"] == "pgkeep-stanzas").unwrap();
        let paths: Vec<&str> = projected["projected"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["configMap"]["items"][0]["path"].as_str().unwrap())
            .collect();
        assert_eq!(paths, ["old.toml", "new.toml"]);
    }
}
