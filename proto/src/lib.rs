//! Wire formats of blockrep, as pure codecs with no I/O:
//! - [`nbd`]: the NBD protocol, server side;
//! - [`control`]: requests and replies on a node's control socket (`blockrep-ctl` ⇄ daemon);
//! - [`peer`]: the replication link between two nodes;
//! - [`seal`]: the link's optional encryption, a record layer beneath the peer frames.
pub mod control;
pub mod nbd;
pub mod peer;
pub mod seal;
