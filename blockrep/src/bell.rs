//! The state bell: rung wherever a state that `events` shows changes (the link, the peer's
//! view, the role, the metadata, a suspension, the clients), so that a follower of `events`
//! hears of it at once rather than at its next poll, and a state that lasts only a moment is
//! still seen (DRBD's `events2` reports every change).
//!
//! Process-wide: a daemon serves one resource, and a ring that reaches a follower of
//! another resource (unit tests run several in one process) costs it one status and no line.

use std::sync::OnceLock;

use tokio::sync::watch;

fn bell() -> &'static watch::Sender<u64> {
    static BELL: OnceLock<watch::Sender<u64>> = OnceLock::new();
    BELL.get_or_init(|| watch::channel(0).0)
}

/// Something `events` shows may have changed. Cheap (a lock and a wake-up of the followers,
/// if any), callable from any thread.
pub fn ring() {
    bell().send_modify(|n| *n = n.wrapping_add(1));
}

/// For a follower: `changed()` returns after the next ring (rings before it are coalesced).
pub fn subscribe() -> watch::Receiver<u64> {
    bell().subscribe()
}

#[cfg(test)]
mod tests {
    /// (Not that rings coalesce: other tests of this process ring the same bell.)
    #[tokio::test]
    async fn a_ring_wakes_a_follower() {
        let mut f = super::subscribe();
        f.borrow_and_update();
        super::ring();
        super::ring();
        tokio::time::timeout(std::time::Duration::from_secs(5), f.changed())
            .await
            .expect("woken")
            .expect("the bell lives as long as the process");
    }
}
