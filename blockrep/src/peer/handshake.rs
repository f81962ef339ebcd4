//! The handshake: who the peer is, that it holds the secret, and what state it is in.
//!
//! Both send `Hello` (version, resource, node, fresh nonce); both prove the secret with an
//! HMAC-SHA256 over both nonces, the dialing node first (the dialed one answers only a valid
//! proof); both send `State`, which is checked against what this node can accept (sizes,
//! sequence bounds) before anything else is exchanged.

use super::*;

pub(super) type HmacSha256 = Hmac<Sha256>;

pub(super) fn mac(secret: &[u8], input: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(input);
    m.finalize().into_bytes().into()
}

pub(super) fn verify(secret: &[u8], input: &[u8], tag: &[u8; 32]) -> bool {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(input);
    m.verify_slice(tag).is_ok()
}

/// A fresh random nonce, or `None` without a random source: a nonce from the time and the
/// process id could be predicted, and a stranger that had this node prove itself over a
/// predicted nonce of its peer could replay that proof to the peer.
pub(super) fn nonce() -> Option<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).ok().map(|()| n)
}

/// An authenticated connection and the peer's state at handshake.
pub(super) struct Established {
    pub(super) rd: BufReader<LinkRead>,
    pub(super) wr: LinkWrite,
    pub(super) addr: SocketAddr,
    /// Every byte after the handshake is sealed (`encryption` as both nodes had it then).
    pub(super) sealed: bool,
    /// The split-brain policy both hellos named: the one this connection decides by, even
    /// if an `adjust` changes the config meanwhile (the peer decides by it too).
    pub(super) after_sb_0pri: crate::state::AfterSb0Pri,
}

/// The protocol as it travels in the hello.
pub(crate) fn protocol_letter(p: Protocol) -> u8 {
    match p {
        Protocol::A => b'A',
        Protocol::B => b'B',
        Protocol::C => b'C',
    }
}

/// The protocol of a letter from the peer (`None`: not one).
pub(super) fn protocol_of_letter(l: u8) -> Option<Protocol> {
    [Protocol::A, Protocol::B, Protocol::C]
        .into_iter()
        .find(|&p| protocol_letter(p) == l)
}

/// `dialed`: this node opened the connection (the proofs say which side each made).
/// Hello and mutual authentication (the states follow in [`super::connection`]).
pub(super) async fn handshake(
    res: &Arc<Resource>,
    mut s: TcpStream,
    addr: SocketAddr,
    dialed: bool,
) -> Result<Established, LinkError> {
    let cfg = res.cfg();
    let peer_name = cfg
        .peer
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let Some(secret) = res.link_key() else {
        return Err(LinkError::Closed("no shared secret configured"));
    };
    // At most 1 MiB (the config's bound): fits the hello's field.
    let granularity = u32::try_from(cfg.bitmap_granularity).unwrap_or(u32::MAX);
    let Some(my_nonce) = nonce() else {
        tracing::error!("no random source for the handshake's nonce: the connection is not made");
        return Err(LinkError::Closed(
            "no random source for the handshake's nonce",
        ));
    };
    write_msg(
        &mut s,
        &Msg::Hello {
            version: peer::PROTOCOL_VERSION,
            resource: cfg.resource.clone(),
            node: cfg.me.name.clone(),
            nonce: my_nonce,
            encryption: cfg.encryption,
            protocol: protocol_letter(cfg.protocol),
            bitmap_granularity: granularity,
            after_sb_0pri: cfg.after_sb_0pri as u8,
            direct_io: cfg.direct_io,
        },
    )
    .await?;
    let (msg, _, _) = timed(
        "waiting for the peer's hello",
        read_frame_before_auth(&mut s),
    )
    .await?;
    let their_nonce = match msg {
        Msg::Hello {
            version,
            resource,
            node,
            nonce,
            encryption,
            protocol,
            bitmap_granularity,
            after_sb_0pri,
            direct_io,
        } => {
            if version != peer::PROTOCOL_VERSION {
                return Err(refuse(
                    &mut s,
                    format!(
                        "protocol version {version} from {addr}; this node speaks {}",
                        peer::PROTOCOL_VERSION
                    ),
                )
                .await);
            }
            if resource != cfg.resource {
                return Err(refuse(
                    &mut s,
                    format!(
                        "peer at {addr} is for resource {resource:?}, not {:?}",
                        cfg.resource
                    ),
                )
                .await);
            }
            if node != peer_name {
                return Err(refuse(
                    &mut s,
                    format!("peer at {addr} calls itself {node:?}; expected {peer_name:?}"),
                )
                .await);
            }
            if encryption != cfg.encryption {
                let name = |on: bool| if on { "aes-256-gcm" } else { "none" };
                return Err(refuse(
                    &mut s,
                    format!(
                        "encryption differs: {node} at {addr} has {:?}, {} has {:?}; set the same `encryption` on both nodes",
                        name(encryption),
                        cfg.me.name,
                        name(cfg.encryption)
                    ),
                )
                .await);
            }
            if protocol != protocol_letter(cfg.protocol) {
                return Err(refuse(
                    &mut s,
                    format!(
                        "replication protocol differs: {node} at {addr} has {}, {} has {}; set the same `protocol` on both nodes",
                        char::from(protocol).escape_default(),
                        cfg.me.name,
                        cfg.protocol
                    ),
                )
                .await);
            }
            if bitmap_granularity != granularity {
                return Err(refuse(
                    &mut s,
                    format!(
                        "bitmap granularity differs: {node} at {addr} has {bitmap_granularity} bytes per bit, {} has {granularity}; set the same `bitmap-granularity` on both nodes",
                        cfg.me.name
                    ),
                )
                .await);
            }
            if after_sb_0pri != cfg.after_sb_0pri as u8 {
                return Err(refuse(
                    &mut s,
                    format!(
                        "split-brain policy differs: {node} at {addr} has after-sb-0pri {}, {} has {}; set the same `after-sb-0pri` on both nodes",
                        crate::state::AfterSb0Pri::from_code(after_sb_0pri)
                            .map_or_else(|| format!("code {after_sb_0pri}"), |p| p.name().to_string()),
                        cfg.me.name,
                        cfg.after_sb_0pri.name()
                    ),
                )
                .await);
            }
            if direct_io != cfg.direct_io {
                return Err(refuse(
                    &mut s,
                    format!(
                        "direct-io differs: {node} at {addr} has direct-io = {direct_io}, {} has {}; set the same `direct-io` on both nodes (a node with it takes only 4 KiB-aligned writes, and could not apply the smaller ones a primary without it accepts)",
                        cfg.me.name, cfg.direct_io
                    ),
                )
                .await);
            }
            nonce
        }
        Msg::Refuse { reason } => return Err(refused_before_auth(reason)),
        other => {
            return Err(LinkError::Protocol(format!(
                "expected hello, got {other:?}"
            )))
        }
    };
    // Both hellos announced the same settings (checked above).
    let party = |name, dialed| peer::AuthParty {
        name,
        dialed,
        protocol: protocol_letter(cfg.protocol),
        encryption: cfg.encryption,
        bitmap_granularity: granularity,
        after_sb_0pri: cfg.after_sb_0pri as u8,
        direct_io: cfg.direct_io,
    };
    let proof = mac(
        &secret,
        &peer::auth_input(
            &their_nonce,
            &my_nonce,
            &party(&cfg.me.name, dialed),
            &peer_name,
            &cfg.resource,
        ),
    );
    // The dialing node proves first and the node that was dialed only after it has checked
    // that proof: whoever connects to the replication port gets no HMAC to test guesses of
    // the secret against. (The dialer chose whom to contact: its configured peer.)
    if dialed {
        write_msg(&mut s, &Msg::Auth { mac: proof }).await?;
    }
    let (msg, _, _) = timed(
        "waiting for the peer's proof",
        read_frame_before_auth(&mut s),
    )
    .await?;
    match msg {
        Msg::Auth { mac: tag } => {
            let input = peer::auth_input(
                &my_nonce,
                &their_nonce,
                &party(&peer_name, !dialed),
                &cfg.me.name,
                &cfg.resource,
            );
            if !verify(&secret, &input, &tag) {
                if let Some(rep) = res.rep() {
                    rep.stats
                        .auth_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = refuse(&mut s, "authentication failed (wrong shared secret)".into()).await;
                return Err(LinkError::Auth);
            }
        }
        Msg::Refuse { reason } => {
            // The node this one dialed found the proof wrong: the secrets differ (counted on
            // both nodes, as when this node checks a proof itself).
            if dialed && reason.contains("authentication failed") {
                if let Some(rep) = res.rep() {
                    rep.stats
                        .auth_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            return Err(refused_before_auth(reason));
        }
        other => return Err(LinkError::Protocol(format!("expected auth, got {other:?}"))),
    }
    // The peer proved the secret: it is up, and a clean leave it announced earlier no longer
    // makes a plain promotion here safe. Not before the proof: whoever reaches the port
    // could otherwise clear the record (a survivor's plain `primary` would then need
    // --force) or page the `peer-lost` handler for a planned stop. A peer refused for its
    // settings (another protocol version, say) leaves the record: it handed over, so it is
    // not promoted without --force while it cannot connect.
    if let Err(e) = res.peer_heard().await {
        return Err(LinkError::LocalDisk(format!(
            "clearing the record of the peer's clean leave in the metadata: {e}"
        )));
    }
    if !dialed {
        write_msg(&mut s, &Msg::Auth { mac: proof }).await?;
    }
    // From here on, with encryption, every byte travels sealed, the state exchange included.
    let _ = s.set_nodelay(true);
    let keys = cfg.encryption.then(|| LinkKeys {
        send: seal::derive_key(
            &secret,
            &cfg.resource,
            &cfg.me.name,
            &my_nonce,
            &their_nonce,
        ),
        recv: seal::derive_key(&secret, &cfg.resource, &peer_name, &their_nonce, &my_nonce),
    });
    let sealed = keys.is_some();
    let (rd, wr) = link::split(s, keys);
    // Small frames come many to a read; a large payload is read mostly straight into its
    // buffer (a read bigger than the buffer bypasses it), not copied out of this one.
    let rd = BufReader::with_capacity(LINK_READ_BUFFER, rd);
    // The states are exchanged by `connection`, once an earlier connection is gone.
    Ok(Established {
        rd,
        wr,
        addr,
        sealed,
        after_sb_0pri: cfg.after_sb_0pri,
    })
}

/// The state exchange that opens a connection. It runs only once an earlier connection has
/// ended and its writes have landed (`run` settles them first): the primary starts the
/// stream after the applied mark a secondary reports here (after its own crash, it issues
/// new sequences above it), and a mark that moved on after the report would claim records
/// of the new stream. (The primary also clamps acknowledgements to what it sent.)
/// Returns this node's state as sent, and the peer's: both sides decide on the same facts.
pub(super) async fn exchange_states(
    res: &Resource,
    rd: &mut BufReader<LinkRead>,
    wr: &mut LinkWrite,
) -> Result<(NodeState, NodeState), LinkError> {
    let me = res.node_state();
    write_msg(wr, &Msg::State(me.clone())).await?;
    let (msg, _, _) = timed("waiting for the peer's state", read_frame(rd, res)).await?;
    match msg {
        Msg::State(st) => match marks_in_bounds(&st) {
            Ok(()) => Ok((me, st)),
            Err(why) => Err(refuse(wr, why).await),
        },
        Msg::Refuse { reason } => Err(peer_refused(reason)),
        other => Err(LinkError::Protocol(format!(
            "expected state, got {other:?}"
        ))),
    }
}

/// The peer's state is authenticated, but still input: its sequence marks go into sequence
/// arithmetic, and no real history comes near the bound the superblock keeps them under.
pub(super) fn marks_in_bounds(st: &NodeState) -> Result<(), String> {
    let marks = [
        st.applied_seq,
        st.durable_seq,
        st.issued_seq,
        st.journal_first_seq,
        st.peer_durable_seq,
    ];
    if marks.iter().any(|&m| m >= PEER_COUNTER_LIMIT) {
        return Err(format!(
            "the peer's sequence marks (applied, durable, issued, journal, this node's durable issued) {marks:?} are out of bounds (limit {PEER_COUNTER_LIMIT})"
        ));
    }
    // Its disk state picks resync sources and split-brain losers: one of the three codes.
    if st.disk > 2 {
        return Err(format!(
            "the peer reports disk state {} (0 inconsistent, 1 outdated, 2 up to date)",
            st.disk
        ));
    }
    // Its size may shrink this node's export (see `Resource::agree_size`): no smaller than
    // any device create-md accepts.
    if st.size < crate::meta::MIN_DATA {
        return Err(format!(
            "the peer reports a device of {} bytes (at least {} are exported)",
            st.size,
            crate::meta::MIN_DATA
        ));
    }
    Ok(())
}

pub(super) fn too_small_peer(me: &NodeState, peer: &NodeState) -> String {
    format!(
        "peer's device is too small: it has {} bytes of data, this node exports {}",
        peer.size, me.size
    )
}

pub(super) fn too_small_here(me: &NodeState, peer: &NodeState) -> String {
    format!(
        "this node's device is too small: it has {} bytes of data, the peer exports {}",
        me.size, peer.size
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_state_with_marks_past_the_counter_bound_is_refused() {
        let ok = NodeState {
            primary: false,
            disk: 2,
            size: 1 << 30,
            gen: peer::GenIds::default(),
            applied_seq: PEER_COUNTER_LIMIT - 1,
            applied_term: 7,
            durable_seq: 5,
            issued_seq: 9,
            journal_first_seq: 0,
            out_of_sync: 0,
            crashed_primary: false,
            discard_my_data: false,
            promoted_ms: 0,
            disk_failed: false,
            peer_durable_gen: 3,
            peer_durable_seq: 9,
            split_as_primary: false,
        };
        assert_eq!(marks_in_bounds(&ok), Ok(()));
        let bad = [
            NodeState {
                applied_seq: u64::MAX,
                ..ok.clone()
            },
            NodeState {
                issued_seq: PEER_COUNTER_LIMIT,
                ..ok.clone()
            },
            NodeState {
                durable_seq: u64::MAX,
                ..ok.clone()
            },
            NodeState {
                journal_first_seq: PEER_COUNTER_LIMIT,
                ..ok.clone()
            },
            NodeState {
                peer_durable_seq: u64::MAX,
                ..ok.clone()
            },
        ];
        for st in bad {
            let e = marks_in_bounds(&st).unwrap_err();
            assert!(e.contains("out of bounds"), "{e}");
        }
        let e = marks_in_bounds(&NodeState { disk: 3, ..ok }).unwrap_err();
        assert!(e.contains("disk state 3"), "{e}");
    }
}
