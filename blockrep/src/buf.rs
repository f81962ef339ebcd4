//! Page-aligned I/O buffers and a bounded pool of them.
//!
//! Aligned so that the same buffer can go to an O_DIRECT backing device; pooled so that the
//! write path does not allocate per request once warm. The pool is bounded: a burst of large
//! requests allocates, and what does not fit back in the pool is freed.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

pub const ALIGN: usize = 4096;

/// An owned, 4 KiB-aligned byte buffer of a fixed capacity and a variable length.
pub struct Buf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: Buf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        if len == 0 {
            // No allocation for the empty buffers of flush/trim/zero operations.
            return Buf {
                ptr: NonNull::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buf { ptr, len, cap }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length; the bytes up to capacity are always initialised (zeroed at allocation),
    /// so this never exposes uninitialised memory.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "buffer length {len} over capacity {}",
            self.cap
        );
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("aligned layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len <= cap and the whole capacity is initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf(len {}, cap {})", self.len, self.cap)
    }
}

/// Size classes kept by the pool: requests above the largest are allocated and freed.
const CLASSES: [usize; 4] = [4096, 64 * 1024, 1 << 20, 4 << 20];
/// Most bytes the pool keeps per class, whatever its count limit: idle buffers of the large
/// classes must not pin gigabytes after a burst.
const CLASS_KEEP_BYTES: usize = 64 << 20;

/// Fills `buf` from `rd`, checksumming each piece as it arrives (still in cache): a payload's
/// crc32c without a second pass over it. For NBD write payloads and peer frame payloads.
pub async fn read_checksummed<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
) -> std::io::Result<u32> {
    use tokio::io::AsyncReadExt;
    let mut crc = 0u32;
    let mut done = 0;
    while done < buf.len() {
        let n = rd.read(&mut buf[done..]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the stream closed inside a payload",
            ));
        }
        crc = crc32c::crc32c_append(crc, &buf[done..done + n]);
        done += n;
    }
    Ok(crc)
}

/// A bounded pool of buffers by size class.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<Vec<Mutex<Vec<Buf>>>>,
    per_class: usize,
}

impl BufPool {
    pub fn new(per_class: usize) -> Self {
        BufPool {
            inner: Arc::new(CLASSES.iter().map(|_| Mutex::new(Vec::new())).collect()),
            per_class,
        }
    }

    fn class(len: usize) -> Option<usize> {
        CLASSES.iter().position(|&c| len <= c)
    }

    /// The bytes a buffer of `len` really holds (its class, or `len` rounded to the
    /// alignment above the classes): what a memory budget must be charged.
    pub fn footprint(len: usize) -> usize {
        match Self::class(len) {
            Some(c) => CLASSES[c],
            None => len.div_ceil(ALIGN) * ALIGN,
        }
    }

    /// A buffer of `len` bytes. Its contents are whatever the last user left: callers fill it.
    pub fn get(&self, len: usize) -> Buf {
        if let Some(c) = Self::class(len) {
            if let Ok(mut v) = self.inner[c].lock() {
                if let Some(mut b) = v.pop() {
                    b.set_len(len);
                    return b;
                }
            }
            let mut b = Buf::new(CLASSES[c]);
            b.set_len(len);
            return b;
        }
        Buf::new(len)
    }

    /// Returns a buffer to the pool (or frees it if its class is full).
    pub fn put(&self, b: Buf) {
        if let Some(c) = CLASSES.iter().position(|&c| c == b.capacity()) {
            if let Ok(mut v) = self.inner[c].lock() {
                if v.len() < self.per_class.min(CLASS_KEEP_BYTES / CLASSES[c]) {
                    v.push(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = Buf::new(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.len(), 5000);
    }

    #[test]
    fn pool_reuses_and_bounds() {
        let p = BufPool::new(2);
        let mut a = p.get(100);
        a[0] = 7;
        let ptr = a.as_ptr();
        p.put(a);
        let b = p.get(4096);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 4096);
        let big = p.get(10 << 20);
        assert_eq!(big.len(), 10 << 20);
        p.put(big); // not a class: freed
        for _ in 0..5 {
            p.put(Buf::new(4096));
        }
        assert_eq!(p.inner[0].lock().unwrap().len(), 2);
    }

    #[test]
    fn footprint_is_what_the_pool_hands_out_and_large_classes_keep_few() {
        for len in [0, 1, 4096, 4097, 69_632, 1 << 20, (1 << 20) + 4096, 5 << 20] {
            assert_eq!(BufPool::footprint(len), BufPool::new(1).get(len).capacity());
        }
        let p = BufPool::new(512);
        for _ in 0..100 {
            p.put(Buf::new(4 << 20));
        }
        assert_eq!(
            p.inner[3].lock().unwrap().len(),
            CLASS_KEEP_BYTES / (4 << 20)
        );
    }
}
