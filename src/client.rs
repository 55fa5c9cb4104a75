//! A CRI ImageService client over a unix socket: what the `cri-imaged pull|images|
//! inspecti|rmi|imagefsinfo` subcommands (crictl's image verbs) and the tests use.

use crate::proto::image_service_client::ImageServiceClient;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {0:?} is not unix:///path or an absolute socket path")]
    BadEndpoint(String),
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Parses `unix:///path` (or a bare absolute path) to the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ClientError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(ClientError::BadEndpoint(endpoint.to_string()))
    }
}

/// A gRPC channel to a unix socket endpoint, for any service on it (the
/// ImageService here, gRPC health in the tests).
pub async fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    let path = socket_path(endpoint)?;
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::1]:0")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })
}

/// Connects to the ImageService at a unix socket endpoint.
pub async fn connect(endpoint: &str) -> Result<ImageServiceClient<Channel>, ClientError> {
    Ok(ImageServiceClient::new(channel(endpoint).await?)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            socket_path("unix:///run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        assert_eq!(
            socket_path("/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative").is_err());
    }
}
