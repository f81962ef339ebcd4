//! Finds data a user would lose: a filesystem (or a partition table, a swap area, a LUKS
//! container) at the start of a backing device, and how far into the device it reaches.
//!
//! Why: `create-md` with internal metadata takes the end of the device for the bitmap, the
//! activity log and the journal. On a device that already holds a filesystem (an admin
//! turning an existing disk into a replicated one, as DRBD's guide describes) that silently
//! cuts off the filesystem's tail unless it was shrunk first. DRBD's `drbdmeta create-md`
//! refuses in that case; so does ours. Plain parsing of the first [`PROBE_LEN`] bytes; every
//! field read is bounds-checked, so any bytes are safe input.

/// Bytes read from the start of the device: covers btrfs's superblock at 64 KiB.
pub const PROBE_LEN: usize = 0x10000 + 0x1000;

/// What was found, and the bytes from the device's start that it uses (`None`: it extends to
/// the end of whatever device it is on and records no size, as a LUKS container does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub kind: &'static str,
    pub bytes: Option<u64>,
}

impl Found {
    /// "an ext4 filesystem of 1048576 bytes", "a GPT partition table (it uses the whole device)".
    pub fn describe(&self) -> String {
        let article = if self.kind.starts_with(['a', 'e', 'i', 'o', 'u', 'X']) {
            "an"
        } else {
            "a"
        };
        match self.bytes {
            Some(b) => format!("{article} {} of {b} bytes", self.kind),
            None => format!(
                "{article} {} (it extends to the end of the device)",
                self.kind
            ),
        }
    }

    /// Whether keeping the first `keep` bytes of the device cuts it.
    pub fn cut_by(&self, keep: u64) -> bool {
        self.bytes.is_none_or(|b| b > keep)
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn has(b: &[u8], at: usize, magic: &[u8]) -> bool {
    b.get(at..at + magic.len()) == Some(magic)
}

/// Looks at the first bytes of a device (`head`, up to [`PROBE_LEN`]).
pub fn probe(head: &[u8]) -> Option<Found> {
    ext(head)
        .or_else(|| xfs(head))
        .or_else(|| btrfs(head))
        .or_else(|| swap(head))
        .or_else(|| {
            has(head, 0, b"LUKS\xba\xbe").then_some(Found {
                kind: "LUKS container",
                bytes: None,
            })
        })
        .or_else(|| gpt(head))
        .or_else(|| lvm(head))
        .or_else(|| mbr(head))
}

/// GPT: header "EFI PART" in LBA 1 (offset 512, or 4096 on 4K-sector disks); its alternate
/// (backup) header's LBA at +0x28 is the device's last sector when the table was made.
fn gpt(b: &[u8]) -> Option<Found> {
    for sector in [512u64, 4096] {
        let at = sector as usize;
        if has(b, at, b"EFI PART") {
            let backup = le64(b, at + 0x28)?;
            return Some(Found {
                kind: "GPT partition table",
                bytes: backup.checked_add(1).and_then(|n| n.checked_mul(sector)),
            });
        }
    }
    None
}

/// LVM2 physical volume: label "LABELONE" in one of the first four sectors, type "LVM2 001"
/// at +24, the pv_header at the label's +20 offset, its device size (after a 32-byte UUID).
fn lvm(b: &[u8]) -> Option<Found> {
    for sector in 0..4usize {
        let at = sector * 512;
        if has(b, at, b"LABELONE") && has(b, at + 24, b"LVM2 001") {
            let pv = at + le32(b, at + 20)? as usize;
            return Some(Found {
                kind: "LVM physical volume",
                bytes: Some(le64(b, pv + 32)?).filter(|&n| n > 0),
            });
        }
    }
    None
}

/// DOS partition table: 0x55AA at 510 and four 16-byte entries at 446 (status 0x00 or 0x80,
/// type at +4, first sector at +8, sector count at +12). A boot sector of a filesystem has
/// the same signature, so only a table whose entries all look valid, with at least one
/// partition, counts.
fn mbr(b: &[u8]) -> Option<Found> {
    if !has(b, 510, &[0x55, 0xAA]) {
        return None;
    }
    let mut end = 0u64;
    for i in 0..4 {
        let e = 446 + 16 * i;
        let status = *b.get(e)?;
        let kind = *b.get(e + 4)?;
        if status != 0 && status != 0x80 {
            return None;
        }
        if kind == 0 {
            continue;
        }
        let first = u64::from(le32(b, e + 8)?);
        let count = u64::from(le32(b, e + 12)?);
        if first == 0 || count == 0 {
            return None;
        }
        end = end.max((first + count) * 512);
    }
    (end > 0).then_some(Found {
        kind: "DOS partition table",
        bytes: Some(end),
    })
}

/// ext2/3/4: superblock at 1024, magic 0xEF53 at +56; blocks count lo at +4, hi at +0x150
/// (64-bit feature, incompat bit 0x80 at +0x60); block size 1024 << s_log_block_size (+24).
fn ext(b: &[u8]) -> Option<Found> {
    const SB: usize = 1024;
    if le16(b, SB + 56)? != 0xEF53 {
        return None;
    }
    let log = le32(b, SB + 24)?;
    if log > 6 {
        return None;
    }
    let block = 1024u64 << log;
    let incompat = le32(b, SB + 0x60)?;
    let mut blocks = u64::from(le32(b, SB + 4)?);
    if incompat & 0x80 != 0 {
        blocks |= u64::from(le32(b, SB + 0x150)?) << 32;
    }
    // extents, 64bit, flex_bg: features only ext4 has.
    let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 {
        "ext4 filesystem"
    } else if le32(b, SB + 0x5C)? & 0x4 != 0 {
        "ext3 filesystem"
    } else {
        "ext2 filesystem"
    };
    Some(Found {
        kind,
        bytes: blocks.checked_mul(block),
    })
}

/// XFS: "XFSB" at 0, big-endian block size at 4 and data blocks at 8.
fn xfs(b: &[u8]) -> Option<Found> {
    if !has(b, 0, b"XFSB") {
        return None;
    }
    let block = u64::from(be32(b, 4)?);
    let blocks = be64(b, 8)?;
    Some(Found {
        kind: "XFS filesystem",
        bytes: blocks.checked_mul(block),
    })
}

/// btrfs: superblock at 64 KiB, magic "_BHRfS_M" at +0x40. What this device holds is its
/// own device item's size (dev_item at +0xC9, total_bytes at +8 in it); the filesystem's total
/// at +0x70 spans every device of a multi-device filesystem.
fn btrfs(b: &[u8]) -> Option<Found> {
    const SB: usize = 0x10000;
    if !has(b, SB + 0x40, b"_BHRfS_M") {
        return None;
    }
    let mine = le64(b, SB + 0xC9 + 8)?;
    Some(Found {
        kind: "btrfs filesystem",
        bytes: Some(if mine > 0 { mine } else { le64(b, SB + 0x70)? }),
    })
}

/// Linux swap: "SWAPSPACE2" in the last ten bytes of the first page (4 KiB pages assumed;
/// other page sizes are reported as using the whole device); last page index at 1024+4.
fn swap(b: &[u8]) -> Option<Found> {
    for page in [4096usize, 8192, 16384, 65536] {
        if has(b, page - 10, b"SWAPSPACE2") {
            let last = u64::from(le32(b, 1024 + 4)?);
            return Some(Found {
                kind: "swap area",
                bytes: (page == 4096).then(|| (last + 1) * 4096),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> Vec<u8> {
        vec![0u8; PROBE_LEN]
    }

    #[test]
    fn nothing_on_zeroes_or_short_input() {
        assert_eq!(probe(&blank()), None);
        assert_eq!(probe(&[]), None);
        assert_eq!(probe(&[0xEF; 100]), None);
    }

    #[test]
    fn ext4_size_from_the_superblock() {
        let mut b = blank();
        b[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        b[1024 + 4..1024 + 8].copy_from_slice(&1000u32.to_le_bytes());
        b[1024 + 0x60..1024 + 0x64].copy_from_slice(&0x40u32.to_le_bytes()); // extents
        let f = probe(&b).expect("found");
        assert_eq!(f.kind, "ext4 filesystem");
        assert_eq!(f.bytes, Some(4_096_000));
        assert!(f.cut_by(4_095_999));
        assert!(!f.cut_by(4_096_000));
        // 64-bit: the high word counts.
        b[1024 + 0x60..1024 + 0x64].copy_from_slice(&0xC0u32.to_le_bytes());
        b[1024 + 0x150..1024 + 0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            probe(&b).and_then(|f| f.bytes),
            Some(((1u64 << 32) + 1000) * 4096)
        );
        // A block size no ext filesystem has is not an ext filesystem.
        b[1024 + 24..1024 + 28].copy_from_slice(&30u32.to_le_bytes());
        assert_eq!(probe(&b), None);
    }

    #[test]
    fn xfs_btrfs_swap_luks_gpt() {
        let mut b = blank();
        b[0..4].copy_from_slice(b"XFSB");
        b[4..8].copy_from_slice(&4096u32.to_be_bytes());
        b[8..16].copy_from_slice(&10u64.to_be_bytes());
        assert_eq!(probe(&b).and_then(|f| f.bytes), Some(40960));

        let mut b = blank();
        b[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        b[0x10070..0x10078].copy_from_slice(&(3u64 << 30).to_le_bytes());
        // This device's share of a multi-device filesystem.
        b[0x100D1..0x100D9].copy_from_slice(&(1u64 << 30).to_le_bytes());
        assert_eq!(
            probe(&b),
            Some(Found {
                kind: "btrfs filesystem",
                bytes: Some(1 << 30)
            })
        );

        let mut b = blank();
        b[4086..4096].copy_from_slice(b"SWAPSPACE2");
        b[1028..1032].copy_from_slice(&255u32.to_le_bytes());
        assert_eq!(probe(&b).and_then(|f| f.bytes), Some(256 * 4096));

        let mut b = blank();
        b[0..6].copy_from_slice(b"LUKS\xba\xbe");
        let f = probe(&b).expect("luks");
        assert!(f.cut_by(u64::MAX), "a LUKS container uses the whole device");

        // GPT: the backup header's LBA gives the end, on 512- and 4096-byte sectors.
        for sector in [512usize, 4096] {
            let mut b = blank();
            b[510] = 0x55;
            b[511] = 0xAA;
            b[446 + 4] = 0xEE; // the protective MBR does not hide the GPT
            b[446 + 8] = 1;
            b[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
            b[sector..sector + 8].copy_from_slice(b"EFI PART");
            b[sector + 0x28..sector + 0x30].copy_from_slice(&999u64.to_le_bytes());
            assert_eq!(
                probe(&b),
                Some(Found {
                    kind: "GPT partition table",
                    bytes: Some(1000 * sector as u64)
                })
            );
        }

        // LVM: the PV's recorded size.
        let mut b = blank();
        b[512..520].copy_from_slice(b"LABELONE");
        b[512 + 20..512 + 24].copy_from_slice(&32u32.to_le_bytes());
        b[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        b[512 + 64..512 + 72].copy_from_slice(&(5u64 << 20).to_le_bytes());
        assert_eq!(probe(&b).and_then(|f| f.bytes), Some(5 << 20));

        // DOS partitions: the furthest end; a boot sector with junk entries is not a table.
        let mut b = blank();
        b[510] = 0x55;
        b[511] = 0xAA;
        for (i, (first, count)) in [(2048u32, 4096u32), (8192, 100)].iter().enumerate() {
            let e = 446 + 16 * i;
            b[e + 4] = 0x83;
            b[e + 8..e + 12].copy_from_slice(&first.to_le_bytes());
            b[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
        }
        assert_eq!(probe(&b).and_then(|f| f.bytes), Some(8292 * 512));
        b[446] = 0x17;
        assert_eq!(probe(&b), None);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for n in [0usize, 1, 1025, 1080, 4096, PROBE_LEN] {
            for _ in 0..200 {
                let b: Vec<u8> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = probe(&b);
            }
        }
    }
}
