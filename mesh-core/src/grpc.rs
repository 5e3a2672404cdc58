//! gRPC channels from proxies to the control plane (xDS and CA).
//!
//! `http://` is plaintext (tests, port 15010); `https://` is TLS 1.3 verified
//! against the mesh trust roots with the control plane's DNS name (15012).
//! Every call carries `authorization: Bearer <token>`, read from the token
//! file at call time so a rotated token is picked up without a restart.

use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{provider, TrustRoots, ALPN_H2};

/// The DNS name istiod-lite's serving certificate carries (Istio's).
pub const CONTROL_PLANE_NAME: &str = "istiod.istio-system.svc";

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("bad control plane address {0:?}: {1}")]
    Address(String, String),
    #[error("https control plane {0:?} needs trust roots")]
    NoRoots(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where the control plane is and how to trust it.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `http://host:port` or `https://host:port`.
    pub address: String,
    /// Trust roots for `https`.
    pub roots: Option<TrustRoots>,
    /// Name the server certificate must carry (default [`CONTROL_PLANE_NAME`]).
    pub server_name: String,
    /// File holding the bearer token (a node bootstrap token or a service-account token).
    pub token_file: Option<PathBuf>,
}

impl ControlPlane {
    pub fn plaintext(address: impl Into<String>) -> Self {
        ControlPlane {
            address: address.into(),
            roots: None,
            server_name: CONTROL_PLANE_NAME.to_string(),
            token_file: None,
        }
    }

    /// A lazily connecting channel: the first call dials, and a broken
    /// connection is re-dialed by the next call.
    pub fn channel(&self) -> Result<Channel, GrpcError> {
        let bad =
            |e: &dyn std::fmt::Display| GrpcError::Address(self.address.clone(), e.to_string());
        let uri: Uri = self.address.parse().map_err(|e| bad(&e))?;
        let endpoint = Endpoint::from(uri.clone())
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10));
        match uri.scheme_str() {
            Some("http") => Ok(endpoint.connect_lazy()),
            Some("https") => {
                let roots = self
                    .roots
                    .as_ref()
                    .ok_or_else(|| GrpcError::NoRoots(self.address.clone()))?;
                let mut config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .with_root_certificates(roots.store())
                    .with_no_client_auth();
                config.alpn_protocols = vec![ALPN_H2.to_vec()];
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let name = ServerName::try_from(self.server_name.clone()).map_err(|e| bad(&e))?;
                let connect = tower::service_fn(move |uri: Uri| {
                    let connector = connector.clone();
                    let name = name.clone();
                    async move {
                        let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']);
                        let port = uri.port_u16().unwrap_or(443);
                        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                        tcp.set_nodelay(true)?;
                        let tls = connector.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(tls))
                    }
                });
                // tonic insists on an http URI once the connector does TLS itself.
                let plain: Uri = self
                    .address
                    .replacen("https://", "http://", 1)
                    .parse()
                    .map_err(|e| bad(&e))?;
                let endpoint = Endpoint::from(plain)
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .http2_keep_alive_interval(std::time::Duration::from_secs(30))
                    .keep_alive_timeout(std::time::Duration::from_secs(10));
                Ok(endpoint.connect_with_connector_lazy(connect))
            }
            other => Err(bad(&format!("scheme {other:?} (http or https)"))),
        }
    }

    pub fn auth(&self) -> BearerToken {
        BearerToken {
            file: self.token_file.clone(),
        }
    }
}

/// Adds `authorization: Bearer <token>` from a file to each call.
#[derive(Clone, Debug)]
pub struct BearerToken {
    file: Option<PathBuf>,
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(file) = &self.file else {
            return Ok(req);
        };
        let token = std::fs::read_to_string(file).map_err(|e| {
            tonic::Status::unauthenticated(format!("reading token {}: {e}", file.display()))
        })?;
        let value: MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| tonic::Status::unauthenticated("token is not valid header text"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// The bearer token of a call, if any (server side).
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}
