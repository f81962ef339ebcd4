//! blockrep: a block-level replicator. This library is the node: configuration, on-disk
//! metadata, backing I/O, the NBD export, the control socket and the peer link.
//!
//! Layers, from the wire down: `nbd_server` (NBD protocol I/O) → `device` (the write path every
//! client write passes through) → `engine` (io_uring or pread/pwrite on the backing device).
//! `meta` is the on-disk metadata, `state` the role logic as pure functions, `resource` and
//! `daemon` assemble them behind the control socket.
pub mod activity;
pub mod bell;
pub mod bitmap;
pub mod buf;
pub mod config;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod fsprobe;
pub mod journal;
pub mod kernel;
pub mod link;
pub mod meta;
pub mod nbd_server;
pub mod notify;
pub mod peer;
pub mod replication;
pub mod resource;
pub mod state;
#[cfg(test)]
mod state_sim;
#[cfg(test)]
pub(crate) mod test_dir;
