//! `cnpgi.identity.v1.Identity`: the plugin's name and the services it
//! offers on this socket.

use pgkeep_cnpgi::proto::identity::identity_server::Identity;
use pgkeep_cnpgi::proto::identity::plugin_capability::service::Type;
use pgkeep_cnpgi::proto::identity::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginMetadataRequest, GetPluginMetadataResponse, ProbeRequest,
    ProbeResponse,
};
use tonic::{Request, Response, Status};

/// The Identity service.
pub struct IdentityService;

/// The services of the instance side.
pub const SERVICES: &[Type] = &[Type::WalService, Type::BackupService, Type::RestoreJob, Type::Metrics];

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_metadata(&self, _: Request<GetPluginMetadataRequest>) -> Result<Response<GetPluginMetadataResponse>, Status> {
        Ok(Response::new(pgkeep_cnpgi::identity::metadata()))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(pgkeep_cnpgi::identity::capabilities(SERVICES)))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: true }))
    }
}
