//! A TCP proxy for fault injection: it forwards bytes both ways until told
//! to become a black hole, after which it keeps every connection open but
//! forwards nothing and accepts new connections without ever answering,
//! as a silent network does (no reset, no FIN), unlike a refused port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// `127.0.0.1:port` to connect to instead of the upstream.
    pub address: String,
    black_hole: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a proxy port");
        let address = listener
            .local_addr()
            .expect("the proxy's address")
            .to_string();
        let black_hole = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let task = {
            let black_hole = Arc::clone(&black_hole);
            let cut = Arc::clone(&cut);
            let forwarded = Arc::clone(&forwarded);
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((client, _)) = listener.accept().await {
                    if black_hole.load(Ordering::SeqCst) {
                        // Accepted by the kernel, never answered.
                        held.push(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    for (from, to) in [
                        (
                            Box::new(client_read) as Box<dyn AsyncReadUnpin>,
                            Box::new(server_write) as Box<dyn AsyncWriteUnpin>,
                        ),
                        (Box::new(server_read), Box::new(client_write)),
                    ] {
                        tokio::spawn(pump(
                            from,
                            to,
                            Arc::clone(&black_hole),
                            Arc::clone(&cut),
                            Arc::clone(&forwarded),
                        ));
                    }
                }
            })
        };
        Proxy {
            address,
            black_hole,
            cut,
            forwarded,
            task,
        }
    }

    /// Closes every forwarded connection at both ends (within 20 ms), as a
    /// network that drops them does: each side sees its peer gone, whatever
    /// was in flight.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// From now on nothing is forwarded and nothing is closed.
    pub fn black_hole(&self) {
        self.black_hole.store(true, Ordering::SeqCst);
    }

    /// Bytes forwarded so far (both ways).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

trait AsyncReadUnpin: tokio::io::AsyncRead + Unpin + Send {}
impl<T: tokio::io::AsyncRead + Unpin + Send> AsyncReadUnpin for T {}
trait AsyncWriteUnpin: tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncWrite + Unpin + Send> AsyncWriteUnpin for T {}

/// Copies one direction until either side closes or the proxy is cut; in
/// black-hole mode it stops reading and writing but keeps both sockets open.
async fn pump(
    mut from: Box<dyn AsyncReadUnpin>,
    mut to: Box<dyn AsyncWriteUnpin>,
    black_hole: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if cut.load(Ordering::SeqCst) {
            // Both halves dropped: the sockets close.
            return;
        }
        if black_hole.load(Ordering::SeqCst) {
            // Hold both halves open, silently, for as long as the test runs.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            continue;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = tokio::time::sleep(Duration::from_millis(20)) => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if black_hole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
        forwarded.fetch_add(n as u64, Ordering::SeqCst);
    }
}
