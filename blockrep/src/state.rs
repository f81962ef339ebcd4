//! The node's role state machine as plain logic: what a role change is allowed to do, decided
//! without sockets or disks so every case is unit-tested. The resource applies the decisions.

use crate::meta::{DiskState, Generations};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// What a promotion does to the persistent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promotion {
    pub disk: DiskState,
    pub gen: Generations,
}

/// What the node knows about its peer when asked to promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerView {
    /// The resource has no peer configured.
    None,
    /// Connected; the peer's role.
    Connected(Role),
    /// Configured but not connected: we cannot know what it does.
    Unknown,
}

/// Decides `primary [--force]`. `new_id` is a fresh random generation id, used when the data
/// starts a new generation (forced promotion, or promotion while the peer cannot follow).
pub fn promote(
    disk: DiskState,
    gen: Generations,
    peer: PeerView,
    force: bool,
    new_id: u64,
) -> Result<Promotion, String> {
    if peer == PeerView::Connected(Role::Primary) {
        return Err("the peer is primary; demote it first (single-primary)".into());
    }
    match disk {
        DiskState::UpToDate => {}
        d if force => {
            tracing::warn!("forced promotion of a {} disk", d.name());
        }
        d => {
            return Err(format!(
            "this node's disk is {}; refusing to promote it (use --force to declare its data good)",
            d.name()
        ))
        }
    }
    if peer == PeerView::Unknown && !force {
        return Err(
            "the peer is not connected, so its role and data are unknown; use --force to promote anyway (failover)"
                .into(),
        );
    }
    // A new generation starts when no connected peer follows this promotion, or the data was
    // declared good by force: history keeps where it came from.
    let new_generation = force || peer != PeerView::Connected(Role::Secondary);
    let gen = if new_generation {
        Generations {
            current: new_id,
            bitmap: gen.bitmap,
            history: [gen.current, gen.history[0]],
        }
    } else {
        gen
    };
    Ok(Promotion {
        disk: DiskState::UpToDate,
        gen,
    })
}

/// Decides `secondary [--force]` given the attached NBD clients.
pub fn demote(clients: u64, force: bool) -> Result<(), String> {
    if clients > 0 && !force {
        return Err(format!(
            "{clients} NBD client(s) attached; unmount and disconnect them first, or use --force to cut them off"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::UUID_JUST_CREATED;

    fn fresh() -> Generations {
        Generations {
            current: UUID_JUST_CREATED,
            ..Default::default()
        }
    }

    #[test]
    fn fresh_disk_needs_force() {
        let e = promote(DiskState::Inconsistent, fresh(), PeerView::None, false, 99).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        let p = promote(DiskState::Inconsistent, fresh(), PeerView::None, true, 99).unwrap();
        assert_eq!(p.disk, DiskState::UpToDate);
        assert_eq!(p.gen.current, 99);
        assert_eq!(p.gen.history[0], UUID_JUST_CREATED);
    }

    #[test]
    fn peer_primary_refuses_even_with_force() {
        for force in [false, true] {
            assert!(promote(
                DiskState::UpToDate,
                fresh(),
                PeerView::Connected(Role::Primary),
                force,
                1
            )
            .is_err());
        }
    }

    #[test]
    fn unknown_peer_needs_force_and_starts_new_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [9, 8],
        };
        assert!(promote(DiskState::UpToDate, g, PeerView::Unknown, false, 11).is_err());
        let p = promote(DiskState::UpToDate, g, PeerView::Unknown, true, 11).unwrap();
        assert_eq!(p.gen.current, 11);
        assert_eq!(p.gen.history, [10, 9]);
    }

    #[test]
    fn connected_secondary_peer_keeps_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [9, 8],
        };
        let p = promote(
            DiskState::UpToDate,
            g,
            PeerView::Connected(Role::Secondary),
            false,
            11,
        )
        .unwrap();
        assert_eq!(p.gen, g);
    }

    #[test]
    fn standalone_up_to_date_promotes_with_new_generation() {
        let g = Generations {
            current: 10,
            bitmap: 0,
            history: [0, 0],
        };
        let p = promote(DiskState::UpToDate, g, PeerView::None, false, 12).unwrap();
        assert_eq!(p.gen.current, 12);
    }

    #[test]
    fn outdated_refused_without_force() {
        assert!(promote(DiskState::Outdated, fresh(), PeerView::None, false, 1).is_err());
    }

    #[test]
    fn demote_with_clients() {
        assert!(demote(0, false).is_ok());
        assert!(demote(2, false).unwrap_err().contains("2 NBD client"));
        assert!(demote(2, true).is_ok());
    }
}
