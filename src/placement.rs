//! Where a buffer that is read from or written to a file puts its first byte. The kernel's copy
//! between the page cache and a buffer runs up to 3x slower when the buffer sits a little ahead
//! of the file offset, and ~1.5x slower when the two are not 32-byte aligned to each other (an
//! `AMD EPYC` with AVX-512 here; docs/BENCHMARKS.md, "Where the bytes land"). So buffers put the
//! byte for file offset `x` at an address congruent to `x` modulo a cache line.

/// The alignment kept between buffer addresses and file offsets.
pub const FILE_ALIGN: usize = 64;

/// The index at or after `floor` in a buffer starting at `base` where the byte for file offset
/// `offset` goes: the buffer needs `FILE_ALIGN - 1` bytes of room past `floor` for it.
pub fn file_aligned(base: *const u8, floor: usize, offset: u64) -> usize {
    let at = (base as usize).wrapping_add(floor);
    floor + (offset as usize).wrapping_sub(at) % FILE_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_each_offset_at_its_alignment() {
        let buf = vec![0u8; 4 * FILE_ALIGN];
        for floor in [0, 1, 63, 64, 100] {
            for offset in [0u64, 1, 44, 63, 64, 1 << 20, (1 << 40) + 17] {
                let i = file_aligned(buf.as_ptr(), floor, offset);
                assert!((floor..floor + FILE_ALIGN).contains(&i));
                let address = buf.as_ptr() as usize + i;
                assert_eq!(address % FILE_ALIGN, offset as usize % FILE_ALIGN);
            }
        }
    }
}
