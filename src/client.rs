//! A CRI ImageService client over a unix socket: what the `cri-imaged pull|images|
//! inspecti|rmi|imagefsinfo` subcommands (crictl's image verbs) and the tests use;
//! and the status socket's client, for `cri-imaged pulls`.

use crate::progress::Pulls;
use crate::proto::image_service_client::ImageServiceClient;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
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

/// Why the status socket did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot connect to the status socket {path} (is cri-imaged running, with `[server] status_listen` there?): {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("status socket {path}: {source}")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("status socket {path}: GET /pulls answered {status}")]
    Status {
        path: PathBuf,
        status: http::StatusCode,
    },
    #[error("status socket {path}: the answer is not the expected JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `GET /pulls` on the daemon's status socket: the pulls in flight.
pub async fn pulls(path: &Path) -> Result<Pulls, StatusError> {
    let http = |source| StatusError::Http {
        path: path.to_path_buf(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| StatusError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let connection = tokio::spawn(connection);
    let request = http::Request::get("/pulls")
        .header(http::header::HOST, "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .expect("a constant request is well-formed");
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    connection.abort();
    if status != http::StatusCode::OK {
        return Err(StatusError::Status {
            path: path.to_path_buf(),
            status,
        });
    }
    serde_json::from_slice(&body).map_err(|source| StatusError::Json {
        path: path.to_path_buf(),
        source,
    })
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
