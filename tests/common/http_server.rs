//! An in-process hyper HTTP/1 server on its own thread and runtime, for the fakes
//! ([`super::token`], [`super::fake_registry`]): it keeps answering while the test
//! blocks on a child process (skopeo, ctr) or a harness call. Stopped on drop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use tokio::sync::oneshot;

use super::{IoContext, Result};

/// A running server thread; shut down and joined on drop.
pub struct ServerThread {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Binds a free port on 127.0.0.1 and serves every connection with `handle`,
    /// over TLS when `tls` is given. `what` names the server in errors and logs.
    pub fn start<H, F, B>(
        what: &'static str,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handle: H,
    ) -> Result<ServerThread>
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").ctx(|| format!("binding {what}"))?;
        listener
            .set_nonblocking(true)
            .ctx(|| format!("{what} listener"))?;
        let addr = listener.local_addr().ctx(|| format!("{what} address"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| format!("{what} runtime"))?;
        let (shutdown, stop) = oneshot::channel();
        let thread =
            std::thread::spawn(move || runtime.block_on(serve(what, listener, tls, handle, stop)));
        Ok(ServerThread {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve<H, F, B>(
    what: &'static str,
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handle: H,
    mut stop: oneshot::Receiver<()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("{what} listener: {e}");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("{what} accept: {e}");
                    continue;
                }
            },
        };
        let tls = tls.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = handle(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            // Connection errors are the faults a fake injects (a dropped body), TLS
            // hellos sent to a plain-HTTP port, clients hanging up: nothing to act on.
            let served = match tls {
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                    Err(e) => {
                        tracing::warn!("{what} TLS handshake: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!("{what} connection: {e}");
            }
        });
    }
}
