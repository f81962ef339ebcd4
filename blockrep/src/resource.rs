//! A resource that is up on this node: backing device, metadata, engine, export, role.
//! `up` builds it, `down` takes it apart in order (refuse, drain, flush, persist).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::control::Status;
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use crate::config::{Config, ExportAddr, MetaLocation};
use crate::device::Device;
use crate::meta::{MetaError, MetaStore};
use crate::nbd_server::{self, Export};
use crate::state::{self, PeerView, Role};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

pub struct Resource {
    cfg: Config,
    meta: Mutex<MetaStore>,
    device: Arc<Device>,
    export: Arc<Export>,
    role: Mutex<Role>,
    listener: JoinHandle<()>,
    unix_path: Option<PathBuf>,
    kernel: tokio::sync::Mutex<Option<crate::kernel::Attachment>>,
    kernel_note: Mutex<Option<String>>,
}

fn secondary_reason(cfg: &Config) -> String {
    format!(
        "resource {} is secondary on node {}: only the primary serves I/O (blockrep-ctl primary)",
        cfg.resource, cfg.me.name
    )
}

impl Resource {
    /// Opens the backing device and metadata, starts the engine and the export listener.
    /// The node comes up secondary, as DRBD's does.
    pub async fn up(cfg: &Config) -> Result<Arc<Self>, NodeError> {
        let external = match &cfg.me.meta {
            MetaLocation::Internal => None,
            MetaLocation::External(p) => Some(p.clone()),
        };
        let meta = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || {
                MetaStore::open(
                    &cfg.me.backing,
                    external.as_deref(),
                    &cfg.resource,
                    &cfg.me.name,
                )
            })
            .await
            .map_err(|e| NodeError::Refused(format!("metadata task failed: {e}")))??
        };
        if meta.sb.was_primary {
            tracing::warn!(
                "node {} was primary when it stopped last: it did not go down cleanly",
                cfg.me.name
            );
        }
        let size = meta.sb.layout.data_size;
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if cfg.direct_io {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(&cfg.me.backing)
            .map_err(io_err(format!("opening {}", cfg.me.backing.display())))?;
        let engine = crate::engine::open(Arc::new(file), cfg.io_engine)
            .map_err(io_err("starting the I/O engine"))?;
        let device = Arc::new(Device::new(engine, size, cfg.direct_io));
        let export = Export::new(
            cfg.resource.clone(),
            device.clone(),
            Some(secondary_reason(cfg)),
        );
        let (listener, unix_path) = match &cfg.me.export {
            ExportAddr::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(io_err(format!("binding the NBD export on {addr}")))?;
                let export = export.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, peer)) => {
                                let _ = s.set_nodelay(true);
                                tokio::spawn(nbd_server::serve(
                                    s,
                                    export.clone(),
                                    peer.to_string(),
                                ));
                            }
                            Err(e) => {
                                tracing::warn!("nbd accept: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                (task, None)
            }
            ExportAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path).map_err(io_err(format!(
                    "binding the NBD export on {}",
                    path.display()
                )))?;
                let export = export.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => {
                                tokio::spawn(nbd_server::serve(s, export.clone(), "unix".into()));
                            }
                            Err(e) => {
                                tracing::warn!("nbd accept: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                (task, Some(path.clone()))
            }
        };
        tracing::info!(
            "resource {} up on node {}: {} bytes exported on {} ({} engine)",
            cfg.resource,
            cfg.me.name,
            size,
            cfg.me.export,
            device.engine_name()
        );
        Ok(Arc::new(Resource {
            cfg: cfg.clone(),
            meta: Mutex::new(meta),
            device,
            export,
            role: Mutex::new(Role::Secondary),
            listener,
            unix_path,
            kernel: tokio::sync::Mutex::new(None),
            kernel_note: Mutex::new(None),
        }))
    }

    pub fn role(&self) -> Role {
        self.role.lock().map(|r| *r).unwrap_or(Role::Secondary)
    }

    fn with_meta<T>(&self, f: impl FnOnce(&mut MetaStore) -> T) -> Result<T, NodeError> {
        let mut m = self
            .meta
            .lock()
            .map_err(|_| NodeError::Refused("metadata lock poisoned".into()))?;
        Ok(f(&mut m))
    }

    pub fn status(&self, pid: u32) -> Status {
        let (disk, _) = self
            .with_meta(|m| (m.sb.disk.name().to_string(), m.sb.gen))
            .unwrap_or_else(|_| ("unknown".into(), Default::default()));
        Status {
            resource: self.cfg.resource.clone(),
            node: self.cfg.me.name.clone(),
            pid,
            up: true,
            role: self.role().name().into(),
            disk,
            export: self.cfg.me.export.to_string(),
            size: self.device.size(),
            engine: self.device.engine_name().into(),
            kernel_device: self
                .cfg
                .me
                .kernel_device
                .as_ref()
                .map(|p| p.display().to_string()),
            kernel_note: self.kernel_note.lock().ok().and_then(|n| n.clone()),
            clients: self.export.clients(),
            io: self.device.counters.snapshot(),
            replication: None,
        }
    }

    pub async fn primary(&self, force: bool) -> Result<String, NodeError> {
        if self.role() == Role::Primary {
            return Ok(format!("{} is already primary", self.cfg.me.name));
        }
        let peer = if self.cfg.peer.is_some() {
            PeerView::Unknown
        } else {
            PeerView::None
        };
        let new_id = random_id();
        self.with_meta(|m| -> Result<(), NodeError> {
            let p = state::promote(m.sb.disk, m.sb.gen, peer, force, new_id)
                .map_err(NodeError::Refused)?;
            m.sb.disk = p.disk;
            m.sb.gen = p.gen;
            m.sb.was_primary = true;
            Ok(m.commit()?)
        })??;
        if let Ok(mut r) = self.role.lock() {
            *r = Role::Primary;
        }
        self.export.set_refuse(None);
        self.attach_kernel().await;
        tracing::info!("{} promoted to primary", self.cfg.me.name);
        Ok(format!("{} is now primary", self.cfg.me.name))
    }

    pub async fn secondary(&self, force: bool) -> Result<String, NodeError> {
        if self.role() == Role::Secondary {
            return Ok(format!("{} is already secondary", self.cfg.me.name));
        }
        let kernel_attached = self.kernel.lock().await.is_some();
        let clients = self.export.clients() - u64::from(kernel_attached);
        state::demote(clients, force).map_err(NodeError::Refused)?;
        self.stop_serving().await?;
        self.with_meta(|m| {
            m.sb.was_primary = false;
            m.commit()
        })??;
        if let Ok(mut r) = self.role.lock() {
            *r = Role::Secondary;
        }
        tracing::info!("{} demoted to secondary", self.cfg.me.name);
        Ok(format!("{} is now secondary", self.cfg.me.name))
    }

    /// Refuses new clients, detaches the kernel device, drains and closes every connection,
    /// and makes everything written durable.
    async fn stop_serving(&self) -> Result<(), NodeError> {
        self.export.set_refuse(Some(secondary_reason(&self.cfg)));
        self.detach_kernel().await;
        let left = self.export.disconnect_all(Duration::from_secs(20)).await;
        if left > 0 {
            tracing::warn!("{left} NBD connection(s) still draining after 20 s");
        }
        self.device
            .flush()
            .await
            .map_err(|e| NodeError::Refused(format!("flush failed (NBD error {e})")))
    }

    /// `down`: stop serving, persist, release the sockets.
    pub async fn down(&self) -> Result<(), NodeError> {
        self.stop_serving().await?;
        self.listener.abort();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        self.with_meta(|m| {
            m.sb.was_primary = false;
            m.commit()
        })??;
        if let Ok(mut r) = self.role.lock() {
            *r = Role::Secondary;
        }
        tracing::info!(
            "resource {} down on {}",
            self.cfg.resource,
            self.cfg.me.name
        );
        Ok(())
    }

    /// Attaches the configured kernel device to a socketpair served by this export. Where the
    /// kernel has no nbd driver this is noted in status and the socket export keeps serving.
    async fn attach_kernel(&self) {
        let Some(dev) = self.cfg.me.kernel_device.clone() else {
            return;
        };
        let note = |s: String| {
            if let Ok(mut n) = self.kernel_note.lock() {
                *n = Some(s);
            }
        };
        if let Err(e) = crate::kernel::probe(&dev) {
            tracing::warn!("{e}");
            note(e.to_string());
            return;
        }
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                note(format!("socketpair for {}: {e}", dev.display()));
                return;
            }
        };
        let ours = match ours
            .set_nonblocking(true)
            .and_then(|_| tokio::net::UnixStream::from_std(ours))
        {
            Ok(s) => s,
            Err(e) => {
                note(format!("socket for {}: {e}", dev.display()));
                return;
            }
        };
        let (rd, wr) = ours.into_split();
        let export = self.export.clone();
        tokio::spawn(nbd_server::transmission(
            rd,
            wr,
            export,
            nbd_server::Negotiated::default(),
            format!("kernel {}", dev.display()),
        ));
        let size = self.device.size();
        let flags = self.export.transmission_flags();
        let bs = self.device.min_block().max(4096);
        let dev2 = dev.clone();
        let r = tokio::task::spawn_blocking(move || {
            crate::kernel::attach(&dev2, theirs, size, bs, flags, 30)
        })
        .await;
        match r {
            Ok(Ok(a)) => {
                note(format!("{} attached ({})", dev.display(), a.method()));
                tracing::info!(
                    "kernel device {} attached via {}",
                    dev.display(),
                    a.method()
                );
                *self.kernel.lock().await = Some(a);
            }
            Ok(Err(e)) => {
                tracing::warn!("kernel attach of {} failed: {e}", dev.display());
                note(format!("attach failed: {e}"));
            }
            Err(e) => note(format!("attach task failed: {e}")),
        }
    }

    async fn detach_kernel(&self) {
        if let Some(a) = self.kernel.lock().await.take() {
            let dev = self.cfg.me.kernel_device.clone().unwrap_or_default();
            match tokio::task::spawn_blocking(move || a.detach()).await {
                Ok(Ok(())) => tracing::info!("kernel device {} detached", dev.display()),
                Ok(Err(e)) => tracing::warn!("kernel detach of {}: {e}", dev.display()),
                Err(e) => tracing::warn!("kernel detach task: {e}"),
            }
        }
    }
}

/// Removes a socket file left by a dead process; refuses if something still listens on it.
pub async fn remove_stale_socket(path: &std::path::Path) -> Result<(), NodeError> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(NodeError::Refused(format!(
            "{} is in use by another process",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(io_err(format!("removing stale {}", path.display())))
}

/// A fresh random 64-bit generation id (never one of the reserved small values).
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    u64::from_le_bytes(b) | (1 << 63)
}
