//! The plugin's identity, the same on both sides (the agent's Unix socket
//! and the operator-side service), which differ only in the services they
//! offer.

use tonic::{Request, Response, Status};

use crate::proto::identity::identity_server::Identity;
use crate::proto::identity::plugin_capability::service::Type;
use crate::proto::identity::plugin_capability::{self, Service};
use crate::proto::identity::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginMetadataRequest, GetPluginMetadataResponse, PluginCapability,
    ProbeRequest, ProbeResponse,
};

/// `cnpgi.identity.v1.Identity` of a side offering `services`.
pub struct IdentityService {
    /// The services this side offers.
    pub services: &'static [Type],
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_metadata(&self, _: Request<GetPluginMetadataRequest>) -> Result<Response<GetPluginMetadataResponse>, Status> {
        Ok(Response::new(metadata()))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities(self.services)))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: true }))
    }
}

/// The plugin's metadata (the same on both sides).
pub fn metadata() -> GetPluginMetadataResponse {
    GetPluginMetadataResponse {
        name: crate::PLUGIN_NAME.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        display_name: "pgkeep".into(),
        description:
            "PostgreSQL backup and recovery: WAL archiving, full, differential and page-level incremental backups, point-in-time restore"
                .into(),
        project_url: "https://pgkeep.dev".into(),
        repository_url: "https://github.com/pgkeep/pgkeep".into(),
        license: "Apache-2.0".into(),
        license_url: "https://www.apache.org/licenses/LICENSE-2.0".into(),
        maturity: "alpha".into(),
        vendor: "pgkeep".into(),
        manifest: Default::default(),
    }
}

/// The capabilities answer for `services`.
pub fn capabilities(services: &[Type]) -> GetPluginCapabilitiesResponse {
    GetPluginCapabilitiesResponse {
        capabilities: services
            .iter()
            .map(|t| PluginCapability { r#type: Some(plugin_capability::Type::Service(Service { r#type: *t as i32 })) })
            .collect(),
    }
}
