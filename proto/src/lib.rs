//! Wire formats of blockrep, as pure codecs with no I/O:
//! - [`nbd`]: the NBD protocol, server side;
//! - [`control`]: requests and replies on a node's control socket (`blockrep-ctl` ⇄ daemon);
//! - [`peer`]: the replication link between two nodes;
//! - [`bitmap_wire`]: the dirty bitmap's form on that link (parts, run lengths);
//! - [`seal`]: the link's optional encryption, a record layer beneath the peer frames.
pub mod bitmap_wire;
pub mod control;
pub mod nbd;
pub mod peer;
pub mod seal;
