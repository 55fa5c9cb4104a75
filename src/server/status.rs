//! The status socket (`[server] status_listen`): HTTP/1.1 on a unix socket, where
//! `GET /pulls` answers the pulls in flight as JSON ([`crate::progress::Pulls`]).
//! Local and read-only, for `cri-imaged pulls` and `curl --unix-socket`.

use crate::progress::Progress;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

/// A client that sends no request line this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until the task running it is dropped or aborted.
pub async fn serve(listener: UnixListener, progress: Arc<Progress>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, typically: wait rather than spin.
                tracing::warn!(error = %e, "status socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let progress = progress.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let progress = progress.clone();
                async move { Ok::<_, Infallible>(answer(&request, &progress)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "status socket: connection ended with an error");
            }
        });
    }
}

fn answer<B>(request: &Request<B>, progress: &Progress) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/pulls") => match serde_json::to_vec(&progress.snapshot()) {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("encoding JSON: {e}\n").into_bytes(),
            ),
        },
        (_, "/pulls") => {
            let mut response = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"only GET\n".to_vec(),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
            response
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found; GET /pulls lists the pulls in flight\n".to_vec(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(method: Method, path: &str, progress: &Progress) -> Response<Full<Bytes>> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        answer(&request, progress)
    }

    #[test]
    fn pulls_as_json_and_nothing_else() {
        let progress = Progress::new();
        let _pull = progress.begin("example.com/app:1");
        let response = get(Method::GET, "/pulls", &progress);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            get(Method::POST, "/pulls", &progress).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            get(Method::GET, "/", &progress).status(),
            StatusCode::NOT_FOUND
        );
    }
}
