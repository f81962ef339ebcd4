//! A fault-injecting TCP proxy for the peer link: real sockets, real bytes. It listens on
//! 127.0.0.1 and forwards every connection to a target (beta's replication port). A test can
//! cut every live connection, refuse (accept and close at once) new ones, resume, stall the
//! traffic without closing anything (pause), and point the proxy at another target.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    refuse: AtomicBool,
    paused: AtomicBool,
    /// Holds only the target-to-dialer direction (its acknowledgements and pings).
    paused_inbound: AtomicBool,
    /// Sets `paused_inbound` when the needle is seen in the dialer's traffic, before the
    /// bytes that complete it are forwarded.
    pause_inbound_on_needle: AtomicBool,
    /// Sets `paused` once the chunk in which the needle is seen has been forwarded.
    pause_on_needle: AtomicBool,
    /// Live connections: (id, client side, upstream side).
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    /// Bytes to look for in the traffic (a test's plaintext marker) and whether they passed.
    needle: Mutex<Vec<u8>>,
    needle_seen: AtomicBool,
    /// Flip one byte of the dialer's traffic once this many more bytes have passed (0: off).
    corrupt_after: AtomicU64,
    corrupted: AtomicU64,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<(u64, TcpStream, TcpStream)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module docs. Stopped (listener closed, every connection cut) on drop.
pub struct LinkProxy {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on `127.0.0.1:port` and forwards to `target`.
    pub fn start(port: u16, target: SocketAddr) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("proxy: bind {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("proxy: nonblocking listener");
        let shared = Arc::new(Shared::default());
        let target = Arc::new(Mutex::new(target));
        let thread = {
            let shared = shared.clone();
            let target = target.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{port}"))
                .spawn(move || accept_loop(listener, shared, target))
                .expect("proxy: spawn")
        };
        Self {
            addr,
            target,
            shared,
            thread: Some(thread),
        }
    }

    /// Where the proxy listens (the `connect-address` to configure).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        *self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New connections go to `target` (live ones are not touched).
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Shuts down both sockets of every live connection (both ends see the link drop).
    /// Returns how many connections were cut.
    pub fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.shared.conns());
        for (_, a, b) in &conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        conns.len()
    }

    /// Whether new connections are accepted and closed at once (`true`) or forwarded.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Refuses new connections, then cuts the live ones: the link stays down until
    /// [`Self::resume`].
    pub fn cut_and_refuse(&self) -> usize {
        self.set_refuse(true);
        self.cut()
    }

    /// Forwards new connections again.
    pub fn resume(&self) {
        self.set_refuse(false);
    }

    /// Stops forwarding bytes (both directions) without closing anything: a stalled link.
    /// Bytes already read are held and delivered after [`Self::unpause`].
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
    }

    /// Forwards held and new bytes again.
    pub fn unpause(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    /// Stops forwarding what the target sends back to the dialer (its acknowledgements and
    /// pings) while the dialer's traffic still goes through: a reply lost on the way. Bytes
    /// held are delivered after [`Self::unpause_inbound`] unless the connection is cut.
    pub fn pause_inbound(&self) {
        self.shared.paused_inbound.store(true, Ordering::SeqCst);
    }

    pub fn unpause_inbound(&self) {
        self.shared
            .pause_inbound_on_needle
            .store(false, Ordering::SeqCst);
        self.shared.paused_inbound.store(false, Ordering::SeqCst);
    }

    /// Holds the target's replies (see [`Self::pause_inbound`]) from the moment `needle`
    /// passes in the dialer's traffic: the target gets the bytes that carry it, its answer
    /// to them is lost on the way.
    pub fn pause_inbound_at(&self, needle: &[u8]) {
        self.shared
            .pause_inbound_on_needle
            .store(true, Ordering::SeqCst);
        self.watch_for(needle);
    }

    /// Stalls the link (see [`Self::pause`]) right after the chunk of traffic in which
    /// `needle` is seen has been forwarded: the target gets the bytes that carry it (and
    /// whatever else that one read took, at most 64 KiB), and nothing after them.
    pub fn pause_after(&self, needle: &[u8]) {
        self.shared.pause_on_needle.store(true, Ordering::SeqCst);
        self.watch_for(needle);
    }

    /// Live forwarded connections.
    pub fn active(&self) -> usize {
        self.shared.conns().len()
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once because the proxy was refusing.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far (both directions).
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Watches the traffic, both ways, for `needle` from now on.
    pub fn watch_for(&self, needle: &[u8]) {
        *self.shared.needle.lock().unwrap_or_else(|p| p.into_inner()) = needle.to_vec();
        self.shared.needle_seen.store(false, Ordering::SeqCst);
    }

    /// Whether the watched bytes passed through the proxy in the clear.
    pub fn needle_seen(&self) -> bool {
        self.shared.needle_seen.load(Ordering::SeqCst)
    }

    /// Flips one bit of the dialer-to-target traffic after `n` more bytes (a man in the
    /// middle altering the stream).
    pub fn corrupt_after(&self, n: u64) {
        self.shared.corrupt_after.store(n.max(1), Ordering::SeqCst);
    }

    /// How many bytes the proxy altered so far.
    pub fn corrupted(&self) -> u64 {
        self.shared.corrupted.load(Ordering::SeqCst)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, target: Arc<Mutex<SocketAddr>>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let (client, _) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = client.set_nonblocking(false);
        if shared.refuse.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let to = *target.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
            client.try_clone(),
            upstream.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
        ) else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        shared.conns().push((id, c3, u3));
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        for (from, to, outbound) in [(client, u2, true), (upstream, c2, false)] {
            let shared = shared.clone();
            let _ = std::thread::Builder::new()
                .name(format!("proxy-conn-{id}"))
                .spawn(move || pump(from, to, id, shared, outbound));
        }
    }
}

/// Copies `from` to `to` until either side fails; then closes both and forgets the connection.
/// `outbound`: the dialer-to-target direction (where corruption is injected).
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, shared: Arc<Shared>, outbound: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    // The end of the previous chunk, so a needle split across two reads is still found.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let mut pause_now = false;
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while (shared.paused.load(Ordering::SeqCst)
                    || !outbound && shared.paused_inbound.load(Ordering::SeqCst))
                    && !shared.stop.load(Ordering::SeqCst)
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                // Cut while held: what it held goes nowhere.
                if !shared.conns().iter().any(|(i, _, _)| *i == id) {
                    break;
                }
                {
                    let needle = shared.needle.lock().unwrap_or_else(|p| p.into_inner());
                    if !needle.is_empty() {
                        tail.extend_from_slice(&buf[..n]);
                        if tail.windows(needle.len()).any(|w| w == &needle[..]) {
                            shared.needle_seen.store(true, Ordering::SeqCst);
                            if outbound && shared.pause_inbound_on_needle.load(Ordering::SeqCst) {
                                shared.paused_inbound.store(true, Ordering::SeqCst);
                            }
                            if shared.pause_on_needle.swap(false, Ordering::SeqCst) {
                                pause_now = true;
                            }
                        }
                        let keep = tail.len().min(needle.len() - 1);
                        tail.drain(..tail.len() - keep);
                    }
                }
                let left = shared.corrupt_after.load(Ordering::SeqCst);
                if outbound && left > 0 {
                    if left <= n as u64 {
                        buf[left as usize - 1] ^= 0x10;
                        shared.corrupt_after.store(0, Ordering::SeqCst);
                        shared.corrupted.fetch_add(1, Ordering::SeqCst);
                    } else {
                        shared
                            .corrupt_after
                            .store(left - n as u64, Ordering::SeqCst);
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                shared.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                if pause_now {
                    shared.paused.store(true, Ordering::SeqCst);
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.conns().retain(|(i, _, _)| *i != id);
}
