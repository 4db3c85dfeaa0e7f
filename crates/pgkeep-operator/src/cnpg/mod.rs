//! The operator side of the CloudNativePG plugin `pgkeep.dev` (CNPG-I),
//! served by `pgkeep-operator --cnpg-plugin-listen` over TCP with mutual
//! TLS, where CloudNativePG's operator finds it through a Service labelled
//! `cnpg.io/pluginName: pgkeep.dev` (`deploy/cnpg/`):
//!
//! - `Identity`: the plugin, with the operator, lifecycle and
//!   sidecar-injection services;
//! - `OperatorLifecycle`: the sidecar in instance Pods and recovery Jobs
//!   ([`lifecycle`]);
//! - `Operator`: parameters checked when a Cluster is created or changed,
//!   each mistake with its field path; the plugin's status in the Cluster
//!   (`status.pluginStatus[pgkeep.dev]`) from the Stanza's.
//!
//! The Stanzas are pgkeep's own resources, in the Cluster's namespace: the
//! plugin's parameters name them, and their controller (this same
//! operator) keeps their ConfigMaps, token Secrets and status.

pub mod lifecycle;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use kube::{Api, Client};
use pgkeep_cnpgi::cluster::{validate, Cluster, ParamError, Purpose};
use pgkeep_cnpgi::proto::identity::identity_server::IdentityServer;
use pgkeep_cnpgi::proto::identity::plugin_capability::service::Type as Service;
use pgkeep_cnpgi::proto::lifecycle::operator_lifecycle_server::{OperatorLifecycle, OperatorLifecycleServer};
use pgkeep_cnpgi::proto::lifecycle::operator_operation_type::Type as Operation;
use pgkeep_cnpgi::proto::lifecycle::{
    OperatorLifecycleCapabilities, OperatorLifecycleCapabilitiesRequest, OperatorLifecycleCapabilitiesResponse, OperatorLifecycleRequest,
    OperatorLifecycleResponse, OperatorOperationType,
};
use pgkeep_cnpgi::proto::operator::operator_capability::rpc::Type as OperatorRpc;
use pgkeep_cnpgi::proto::operator::operator_capability::{self, Rpc};
use pgkeep_cnpgi::proto::operator::operator_server::{Operator, OperatorServer};
use pgkeep_cnpgi::proto::operator::{
    DeregisterRequest, DeregisterResponse, OperatorCapabilitiesRequest, OperatorCapabilitiesResult, OperatorCapability,
    OperatorMutateClusterRequest, OperatorMutateClusterResult, OperatorValidateClusterChangeRequest, OperatorValidateClusterChangeResult,
    OperatorValidateClusterCreateRequest, OperatorValidateClusterCreateResult, SetStatusInClusterRequest, SetStatusInClusterResponse,
    ValidationError,
};
use serde_json::{json, Value};
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::crd::Stanza;
use lifecycle::Target;

/// How the plugin service runs.
#[derive(Debug, Clone)]
pub struct CnpgPluginConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The server's certificate (PEM; the `tls.crt` of the Secret the
    /// Service's `cnpg.io/pluginServerSecret` names).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The certificate(s) CloudNativePG's client certificate must chain
    /// to (the `tls.crt` of the `cnpg.io/pluginClientSecret` Secret, or its
    /// CA).
    pub client_ca: PathBuf,
    /// The image of the sidecar (it holds `/usr/local/bin/pgkeep`).
    pub image: String,
}

/// The services' state.
#[derive(Clone)]
struct Plugin {
    client: Client,
    image: String,
}

impl Plugin {
    /// The Stanza `name` in `namespace`, or the error CloudNativePG shows.
    async fn stanza(&self, namespace: &str, name: &str, at: &str) -> Result<Stanza, Status> {
        let api: Api<Stanza> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(Status::failed_precondition(format!(
                "{at}.stanza: Stanza '{name}' does not exist in namespace '{namespace}': create it (deploy/examples/stanza.yaml) first"
            ))),
            Err(e) => Err(Status::unavailable(format!("cannot read Stanza '{name}' in namespace '{namespace}': {e}"))),
        }
    }
}

impl Plugin {
    /// Refuses a sidecar that could not start: the Stanza's ConfigMap (its
    /// controller writes it), and the Secrets and keys it names, must
    /// exist, or the Pod would stay in CreateContainerConfigError with
    /// PostgreSQL's container not started.
    async fn check_mounted(&self, ns: &str, stanza: &Stanza, token: bool) -> Result<(), Status> {
        use k8s_openapi::api::core::v1::{ConfigMap, Secret};
        let name = kube::ResourceExt::name_any(stanza);
        let missing = |what: String| {
            Err(Status::failed_precondition(format!(
                "{what} of Stanza '{name}' does not exist in namespace '{ns}': the pgkeep sidecar could not start (is pgkeep's operator watching this namespace, and the Secret created?)"
            )))
        };
        let unavailable = |e: kube::Error| Status::unavailable(format!("cannot read the objects of Stanza '{name}': {e}"));
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let map = crate::render::configmap_name(stanza);
        if maps.get_opt(&map).await.map_err(unavailable)?.is_none() {
            return missing(format!("ConfigMap '{map}'"));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let mut wanted = crate::inject::referenced_secrets(stanza);
        if token {
            wanted.push((crate::pods::token_secret_name(stanza), None));
        }
        for (secret, key) in wanted {
            match secrets.get_opt(&secret).await.map_err(unavailable)? {
                None => return missing(format!("Secret '{secret}'")),
                Some(s) => {
                    if let Some(key) = key {
                        let has = s.data.as_ref().is_some_and(|d| d.contains_key(&key))
                            || s.string_data.as_ref().is_some_and(|d| d.contains_key(&key));
                        if !has {
                            return missing(format!("key '{key}' of Secret '{secret}'"));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn cluster(json: &[u8]) -> Result<Cluster, Status> {
    Cluster::from_json(json).map_err(Status::invalid_argument)
}

/// The roles of the Jobs that recover from a pgkeep source.
pub const RECOVERY_JOBS: &[&str] = &["full-recovery", "snapshot-recovery"];

/// The services of the operator side.
pub const SERVICES: &[Service] =
    &[Service::OperatorService, Service::LifecycleService, Service::InstanceSidecarInjection, Service::InstanceJobSidecarInjection];

#[tonic::async_trait]
impl OperatorLifecycle for Plugin {
    async fn get_capabilities(
        &self,
        _: Request<OperatorLifecycleCapabilitiesRequest>,
    ) -> Result<Response<OperatorLifecycleCapabilitiesResponse>, Status> {
        let ops = |types: &[Operation]| types.iter().map(|t| OperatorOperationType { r#type: *t as i32 }).collect();
        Ok(Response::new(OperatorLifecycleCapabilitiesResponse {
            lifecycle_capabilities: vec![
                OperatorLifecycleCapabilities {
                    group: String::new(),
                    kind: "Pod".into(),
                    operation_types: ops(&[Operation::Create, Operation::Evaluate]),
                },
                OperatorLifecycleCapabilities { group: "batch".into(), kind: "Job".into(), operation_types: ops(&[Operation::Create]) },
            ],
        }))
    }

    async fn lifecycle_hook(&self, req: Request<OperatorLifecycleRequest>) -> Result<Response<OperatorLifecycleResponse>, Status> {
        let req = req.into_inner();
        let cluster = cluster(&req.cluster_definition)?;
        let object: Value =
            serde_json::from_slice(&req.object_definition).map_err(|e| Status::invalid_argument(format!("the object is not JSON: {e}")))?;
        let ns = if cluster.metadata.namespace.is_empty() {
            object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_owned()
        } else {
            cluster.metadata.namespace.clone()
        };
        let ops = match object["kind"].as_str() {
            Some("Pod") => {
                let Ok(own) = cluster.stanza_for(Purpose::Own) else { return Ok(Response::new(OperatorLifecycleResponse::default())) };
                let own = self.stanza(&ns, &own.stanza, &own.path).await?;
                self.check_mounted(&ns, &own, true).await?;
                lifecycle::patch(&object, "/spec", &Target::Pod { own: &own }, &self.image)
            }
            Some("Job") => {
                let role = lifecycle::job_role(&object).unwrap_or_default().to_owned();
                let Ok(source) = cluster.stanza_for(Purpose::Recovery) else {
                    return Ok(Response::new(OperatorLifecycleResponse::default()));
                };
                // Both replay WAL through restore_command in the Job: without
                // the sidecar, a snapshot recovery would find no plugin and
                // end at the snapshot's own WAL.
                if !RECOVERY_JOBS.contains(&role.as_str()) {
                    return Ok(Response::new(OperatorLifecycleResponse::default()));
                }
                let source = self.stanza(&ns, &source.stanza, &source.path).await?;
                self.check_mounted(&ns, &source, false).await?;
                let own = match cluster.stanza_for(Purpose::Own) {
                    Ok(o) => Some(self.stanza(&ns, &o.stanza, &o.path).await?),
                    Err(_) => None,
                };
                if let Some(own) = &own {
                    self.check_mounted(&ns, own, false).await?;
                }
                lifecycle::patch(
                    &object,
                    "/spec/template/spec",
                    &Target::RecoveryJob { source: &source, own: own.as_ref(), container: &role },
                    &self.image,
                )
            }
            _ => return Ok(Response::new(OperatorLifecycleResponse::default())),
        }
        .map_err(Status::failed_precondition)?;
        let json_patch = if ops.is_empty() { Vec::new() } else { serde_json::to_vec(&ops).expect("JSON") };
        Ok(Response::new(OperatorLifecycleResponse { json_patch }))
    }
}

fn validation_errors(errors: Vec<ParamError>) -> Vec<ValidationError> {
    errors.into_iter().map(|e| ValidationError { path_components: e.path, value: e.value, message: e.message }).collect()
}

impl Plugin {
    /// The parameter mistakes of `cluster`, and a Stanza it names that
    /// does not exist.
    async fn check(&self, cluster: &Cluster) -> Vec<ValidationError> {
        let mut errors = validate(cluster);
        if errors.is_empty() {
            for purpose in [Purpose::Own, Purpose::Recovery] {
                let Ok(r) = cluster.stanza_for(purpose) else { continue };
                if let Err(s) = self.stanza(&cluster.metadata.namespace, &r.stanza, &r.path).await {
                    if s.code() == tonic::Code::FailedPrecondition {
                        let mut path: Vec<String> = r.path.split('.').map(str::to_owned).collect();
                        path.push("stanza".into());
                        errors.push(ParamError {
                            path,
                            value: r.stanza.clone(),
                            message: format!("no Stanza '{}' in this namespace", r.stanza),
                        });
                    }
                }
            }
        }
        validation_errors(errors)
    }
}

#[tonic::async_trait]
impl Operator for Plugin {
    async fn get_capabilities(&self, _: Request<OperatorCapabilitiesRequest>) -> Result<Response<OperatorCapabilitiesResult>, Status> {
        let rpc = |t: OperatorRpc| OperatorCapability { r#type: Some(operator_capability::Type::Rpc(Rpc { r#type: t as i32 })) };
        Ok(Response::new(OperatorCapabilitiesResult {
            capabilities: vec![
                rpc(OperatorRpc::ValidateClusterCreate),
                rpc(OperatorRpc::ValidateClusterChange),
                rpc(OperatorRpc::SetStatusInCluster),
            ],
        }))
    }

    async fn validate_cluster_create(
        &self,
        req: Request<OperatorValidateClusterCreateRequest>,
    ) -> Result<Response<OperatorValidateClusterCreateResult>, Status> {
        let cluster = cluster(&req.into_inner().definition)?;
        Ok(Response::new(OperatorValidateClusterCreateResult { validation_errors: self.check(&cluster).await }))
    }

    async fn validate_cluster_change(
        &self,
        req: Request<OperatorValidateClusterChangeRequest>,
    ) -> Result<Response<OperatorValidateClusterChangeResult>, Status> {
        let cluster = cluster(&req.into_inner().new_cluster)?;
        Ok(Response::new(OperatorValidateClusterChangeResult { validation_errors: self.check(&cluster).await }))
    }

    async fn mutate_cluster(&self, _: Request<OperatorMutateClusterRequest>) -> Result<Response<OperatorMutateClusterResult>, Status> {
        Ok(Response::new(OperatorMutateClusterResult::default()))
    }

    async fn set_status_in_cluster(&self, req: Request<SetStatusInClusterRequest>) -> Result<Response<SetStatusInClusterResponse>, Status> {
        let raw = req.into_inner().cluster;
        let cluster = cluster(&raw)?;
        let Ok(own) = cluster.stanza_for(Purpose::Own) else { return Ok(Response::new(SetStatusInClusterResponse::default())) };
        let stanza = self.stanza(&cluster.metadata.namespace, &own.stanza, &own.path).await?;
        let status = stanza.status.unwrap_or_default();
        let last_backup = status.backups.last();
        let json = json!({
            "stanza": own.stanza,
            "firstRecoverabilityPoint": status.first_recoverability_point,
            "lastRecoverabilityPoint": status.last_recoverability_point,
            "lastSuccessfulBackup": status.last_successful_backup,
            "lastFailedBackup": status.last_failed_backup,
            "lastBackup": last_backup.map(|b| &b.label),
            "backups": status.backups.len(),
        });
        // The same status again would make CloudNativePG patch the Cluster
        // and reconcile it again in 5 s: say nothing when nothing changed.
        if current_status(&raw) == Some(json.clone()) {
            return Ok(Response::new(SetStatusInClusterResponse::default()));
        }
        Ok(Response::new(SetStatusInClusterResponse { json_status: serde_json::to_vec(&json).expect("JSON") }))
    }

    async fn deregister(&self, _: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        Ok(Response::new(DeregisterResponse {}))
    }
}

/// The status pgkeep.dev has in the Cluster now
/// (`status.pluginStatus[].status`, JSON in a string).
fn current_status(cluster_json: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(cluster_json).ok()?;
    let entry = v.pointer("/status/pluginStatus")?.as_array()?.iter().find(|p| p["name"] == pgkeep_cnpgi::PLUGIN_NAME)?;
    serde_json::from_str(entry.get("status")?.as_str()?).ok()
}

/// When the certificate files last changed.
fn stamps(cfg: &CnpgPluginConfig) -> Vec<Option<SystemTime>> {
    [&cfg.cert, &cfg.key, &cfg.client_ca].iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

/// Serves the plugin until the process ends. A renewed certificate (the
/// Secret's files change under the mount) is taken by serving again with
/// it: CloudNativePG trusts the Secret's current `tls.crt`.
pub async fn serve(client: Client, cfg: CnpgPluginConfig) -> anyhow::Result<()> {
    let plugin = Plugin { client, image: cfg.image.clone() };
    loop {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()));
        // The three files as one set: read again when one changed while
        // they were read (the kubelet swaps a Secret's files together).
        let (cert, key, ca, seen) = loop {
            let before = stamps(&cfg);
            let (cert, key, ca) = (read(&cfg.cert)?, read(&cfg.key)?, read(&cfg.client_ca)?);
            if stamps(&cfg) == before {
                break (cert, key, ca, before);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(ca));
        let changed = {
            let cfg = cfg.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    if stamps(&cfg) != seen {
                        return;
                    }
                }
            }
        };
        Server::builder()
            .tls_config(tls)?
            .add_service(IdentityServer::new(pgkeep_cnpgi::identity::IdentityService { services: SERVICES }))
            .add_service(OperatorLifecycleServer::new(plugin.clone()))
            .add_service(OperatorServer::new(plugin.clone()))
            .serve_with_shutdown(cfg.listen, changed)
            .await?;
        eprintln!("pgkeep-operator: the CloudNativePG plugin's certificate changed; serving with the new one");
    }
}
