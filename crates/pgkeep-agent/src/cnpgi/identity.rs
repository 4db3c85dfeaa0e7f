//! `cnpgi.identity.v1.Identity` of the instance side: the services this
//! socket offers (the service itself is shared with the operator side,
//! [`pgkeep_cnpgi::identity::IdentityService`]).

use pgkeep_cnpgi::proto::identity::plugin_capability::service::Type;

/// The services of the instance side.
pub const SERVICES: &[Type] = &[Type::WalService, Type::BackupService, Type::RestoreJob, Type::Metrics];
