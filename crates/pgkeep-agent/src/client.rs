//! The operator's client of an agent.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::api::{AgentStatus, ApiError, BackupRequest, Expired, JobStatus, StanzaCreated};

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent did not answer (down, restarting, unreachable).
    #[error("the agent at {0} does not answer: {1}")]
    Unreachable(String, String),
    /// The agent does not know the job (it restarted, or never ran it).
    #[error("{0}")]
    NotFound(String),
    /// The agent answered an error.
    #[error("{}", .0.error)]
    Api(ApiError),
}

impl ClientError {
    /// Whether trying again later can help.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(..) => true,
            ClientError::NotFound(_) => false,
            ClientError::Api(e) => e.retryable,
        }
    }
}

/// One agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AgentClient {
    /// The agent at `host:port` (plain HTTP), with `token`.
    pub fn new(host: &str, port: u16, token: &str) -> AgentClient {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("a client without TLS settings builds");
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
        AgentClient { base: format!("http://{host}:{port}"), token: token.to_owned(), http }
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<AgentStatus, ClientError> {
        self.call(reqwest::Method::GET, "/v1/status", None).await
    }

    /// `GET /v1/info`.
    pub async fn info(&self) -> Result<serde_json::Value, ClientError> {
        self.call(reqwest::Method::GET, "/v1/info", None).await
    }

    /// `POST /v1/stanza`.
    pub async fn create_stanza(&self) -> Result<StanzaCreated, ClientError> {
        self.call(reqwest::Method::POST, "/v1/stanza", Some(b"{}".to_vec())).await
    }

    /// `POST /v1/backups`.
    pub async fn start_backup(&self, req: &BackupRequest) -> Result<JobStatus, ClientError> {
        let body = serde_json::to_vec(req).expect("a request encodes");
        self.call(reqwest::Method::POST, "/v1/backups", Some(body)).await
    }

    /// `GET /v1/backups/{id}`.
    pub async fn backup(&self, id: &str) -> Result<JobStatus, ClientError> {
        self.call(reqwest::Method::GET, &format!("/v1/backups/{id}"), None).await
    }

    /// `DELETE /v1/repository/backups/{label}`.
    pub async fn expire(&self, label: &str) -> Result<Expired, ClientError> {
        self.call(reqwest::Method::DELETE, &format!("/v1/repository/backups/{label}"), None).await
    }

    /// `DELETE /v1/backups/{id}`.
    pub async fn cancel(&self, id: &str) -> Result<JobStatus, ClientError> {
        self.call(reqwest::Method::DELETE, &format!("/v1/backups/{id}"), None).await
    }

    async fn call<T: DeserializeOwned>(&self, method: reqwest::Method, path: &str, body: Option<Vec<u8>>) -> Result<T, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable(self.base.clone(), pgkeep_core::error::OneLine(&e).to_string());
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Api(ApiError {
                    error: format!("the agent at {} answered what this operator cannot read: {e}", self.base),
                    retryable: false,
                })
            });
        }
        let err: ApiError = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiError {
            error: format!("the agent at {} answered {status}", self.base),
            retryable: status.is_server_error(),
        });
        Err(if status == reqwest::StatusCode::NOT_FOUND { ClientError::NotFound(err.error) } else { ClientError::Api(err) })
    }
}
