//! PostgreSQL's data page checksum, and when a page read during an online
//! backup can be judged by it.
//!
//! [`pg_checksum_page`] is `pg_checksum_page` of PostgreSQL's
//! `src/include/storage/checksum_impl.h`: the page is read as 64 rows of 32
//! `u32` words; each of 32 lanes starts from its own base offset and mixes
//! its column with `t = sum ^ value; sum = t * FNV_PRIME ^ (t >> 17)`, then
//! with two rounds of zeros; the lanes are XORed together, the block number
//! is XORed in, and the result is reduced to `(sum % 65535) + 1`. The page's
//! own `pd_checksum` (the `u16` at byte 8) counts as zero. Words are read
//! little-endian, as pgkeep reads every page header (the server's byte
//! order on x86-64 and ARM64).
//!
//! A page read while PostgreSQL may be writing it is judged only when that
//! cannot be a false alarm ([`verify_page`]): a new page (`pd_upper == 0`,
//! which PostgreSQL writes without a checksum) is not judged, nor a partial
//! page, nor a page whose `pd_lsn` is at or after the backup's start. With
//! checksums on, the first change to a page after the backup's checkpoint
//! writes a full-page image and moves `pd_lsn` past the start, so any page
//! that may be changing under the backup carries a newer LSN, and WAL
//! replay rewrites it whatever the backup read (pgBackRest's rule). A page
//! that fails is read once more before it is reported (see [`FileCheck`]),
//! as PostgreSQL's own base backup does, in case the first read raced with
//! a write of that page and saw half of each version.

use std::io;

use crate::repo::pages::{page_lsn, PAGE_SIZE};
use crate::types::Lsn;

/// Number of parallel lanes (`N_SUMS`).
const N_SUMS: usize = 32;
/// The FNV-1a prime (`FNV_PRIME`).
const FNV_PRIME: u32 = 16_777_619;
/// `checksumBaseOffsets`: the lanes' initial values.
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16,
    0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2,
    0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Bytes of one row of the page (one word per lane).
const ROW: usize = N_SUMS * 4;

/// Pages in one segment file of a relation (`RELSEG_SIZE`: 1 GiB of 8 KiB
/// pages). The block number of page `i` of segment file `.N` is
/// `N * PAGES_PER_SEGMENT + i`.
pub const PAGES_PER_SEGMENT: u32 = 131_072;

/// At most this many failing page numbers are listed per file; the rest
/// are only counted.
pub const MAX_LISTED: usize = 1000;

/// One round of the hash (`CHECKSUM_COMP`).
#[inline(always)]
fn comp(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

#[inline(always)]
fn mix_row(sums: &mut [u32; N_SUMS], row: &[u8]) {
    for (sum, word) in sums.iter_mut().zip(row.chunks_exact(4)) {
        *sum = comp(*sum, u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
    }
}

/// PostgreSQL's checksum of `page` (exactly [`PAGE_SIZE`] bytes) as block
/// `blkno` of its relation fork. Panics on a page of another size.
pub fn pg_checksum_page(page: &[u8], blkno: u32) -> u16 {
    assert_eq!(page.len(), PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
    let mut sums = BASE_OFFSETS;
    // The first row holds pd_checksum (bytes 8-9), counted as zero.
    let mut first = [0u8; ROW];
    first.copy_from_slice(&page[..ROW]);
    first[8] = 0;
    first[9] = 0;
    mix_row(&mut sums, &first);
    for row in page[ROW..].chunks_exact(ROW) {
        mix_row(&mut sums, row);
    }
    for _ in 0..2 {
        for sum in &mut sums {
            *sum = comp(*sum, 0);
        }
    }
    let checksum = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    ((checksum % 65535) + 1) as u16
}

/// The checksum a page carries (`pd_checksum`).
pub fn stored_checksum(page: &[u8]) -> u16 {
    u16::from_le_bytes([page[8], page[9]])
}

/// PostgreSQL's `PageIsNew`: the page was never initialised
/// (`pd_upper == 0`), as an all-zero page extending a relation.
pub fn page_is_new(page: &[u8]) -> bool {
    u16::from_le_bytes([page[14], page[15]]) == 0
}

/// What a page read during a backup tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its checksum matches.
    Valid,
    /// It cannot be judged: partial, new, or changed since the backup
    /// started (`pd_lsn` at or after it).
    NotJudged,
    /// Its checksum does not match.
    Invalid,
}

/// Judges `page`, read as block `blkno`, during a backup that started at
/// `start` (see the module documentation).
pub fn verify_page(page: &[u8], blkno: u32, start: Lsn) -> Verdict {
    if page.len() != PAGE_SIZE || page_is_new(page) || page_lsn(page) >= start {
        return Verdict::NotJudged;
    }
    if pg_checksum_page(page, blkno) == stored_checksum(page) {
        Verdict::Valid
    } else {
        Verdict::Invalid
    }
}

/// The page checks of one relation file, fed chunk by chunk as the backup
/// reads it; keeps at most [`MAX_LISTED`] page numbers.
#[derive(Debug)]
pub struct FileCheck {
    first_block: u32,
    start: Lsn,
    listed: Vec<u32>,
    unlisted: u64,
    again: Vec<u8>,
}

impl FileCheck {
    /// Checks for segment file `segment` (the `.N` suffix, 0 without one)
    /// of a relation fork, read by a backup that started at `start`.
    pub fn new(segment: u32, start: Lsn) -> FileCheck {
        FileCheck { first_block: segment.wrapping_mul(PAGES_PER_SEGMENT), start, listed: Vec::new(), unlisted: 0, again: Vec::new() }
    }

    /// Checks the pages of `data`, which starts at page `first` of the
    /// file. A page that fails is read again with `reread(page, buf)`
    /// (which fills `buf` and returns true, or returns false when the file
    /// no longer holds that whole page) and reported only if the second
    /// read fails too.
    pub fn check(&mut self, first: u64, data: &[u8], mut reread: impl FnMut(u64, &mut [u8]) -> io::Result<bool>) -> io::Result<()> {
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            let number = first + i as u64;
            let blkno = self.first_block.wrapping_add(number as u32);
            if verify_page(page, blkno, self.start) != Verdict::Invalid {
                continue;
            }
            self.again.resize(PAGE_SIZE, 0);
            if !reread(number, &mut self.again)? || verify_page(&self.again, blkno, self.start) != Verdict::Invalid {
                continue;
            }
            if self.listed.len() < MAX_LISTED {
                self.listed.push(number as u32);
            } else {
                self.unlisted += 1;
            }
        }
        Ok(())
    }

    /// The failing pages (page numbers in the file, ascending, at most
    /// [`MAX_LISTED`]) and how many more failed beyond those.
    pub fn finish(self) -> (Vec<u32>, u64) {
        (self.listed, self.unlisted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real pages of a PostgreSQL 15 cluster (`testdata/README.md`), with
    /// their block numbers.
    const PAGES: [(&[u8], u32, u16); 2] =
        [(include_bytes!("testdata/heap-block3.page"), 3, 0x701c), (include_bytes!("testdata/btree-block2.page"), 2, 0xde0d)];

    #[test]
    fn matches_the_checksums_postgres_wrote() {
        for (page, blkno, expected) in PAGES {
            assert_eq!(stored_checksum(page), expected);
            assert_eq!(pg_checksum_page(page, blkno), expected, "block {blkno}");
            assert_eq!(verify_page(page, blkno, Lsn(u64::MAX)), Verdict::Valid);
        }
    }

    #[test]
    fn one_flipped_byte_or_the_wrong_block_fails() {
        for (page, blkno, expected) in PAGES {
            assert_ne!(pg_checksum_page(page, blkno + 1), expected, "the block number is part of the checksum");
            assert_ne!(pg_checksum_page(page, blkno + PAGES_PER_SEGMENT), expected);
            for at in [20, 100, 4000, 4096, 8191] {
                let mut bad = page.to_vec();
                bad[at] ^= 0x01;
                assert_ne!(pg_checksum_page(&bad, blkno), expected, "byte {at} flipped");
                assert_eq!(verify_page(&bad, blkno, Lsn(u64::MAX)), Verdict::Invalid, "byte {at} flipped");
            }
            // pd_checksum itself is not part of the sum.
            let mut other = page.to_vec();
            other[8..10].copy_from_slice(&0x1234u16.to_le_bytes());
            assert_eq!(pg_checksum_page(&other, blkno), expected);
        }
    }

    #[test]
    fn new_partial_and_recently_changed_pages_are_not_judged() {
        let (page, blkno, _) = PAGES[0];
        let lsn = page_lsn(page);
        let mut bad = page.to_vec();
        bad[5000] ^= 0xff;
        assert_eq!(verify_page(&bad, blkno, Lsn(lsn.0 + 1)), Verdict::Invalid);
        assert_eq!(verify_page(&bad, blkno, lsn), Verdict::NotJudged, "pd_lsn at the backup start: being changed");
        assert_eq!(verify_page(&bad[..4096], blkno, Lsn(u64::MAX)), Verdict::NotJudged);
        assert_eq!(verify_page(&[0u8; PAGE_SIZE], blkno, Lsn(u64::MAX)), Verdict::NotJudged, "an all-zero page is valid");
        let mut new = vec![0u8; PAGE_SIZE];
        new[3000] = 7;
        assert!(page_is_new(&new));
        assert_eq!(verify_page(&new, blkno, Lsn(u64::MAX)), Verdict::NotJudged);
    }

    #[test]
    fn file_check_uses_the_segment_block_numbers_and_rereads_before_reporting() {
        let (heap, blkno, _) = PAGES[0];
        assert_eq!(blkno, 3);
        let zero = vec![0u8; PAGE_SIZE];
        let mut fresh = zero.clone();
        fresh[100] = 1; // new (pd_upper 0) but not zero: not judged
                        // Page 3 is the heap page where it belongs; page 4 is the same
                        // bytes one block further, which PostgreSQL would also refuse.
        let data = [zero.clone(), zero.clone(), zero, heap.to_vec(), heap.to_vec(), fresh].concat();
        let start = Lsn(u64::MAX);
        let reread = |n: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&data[n as usize * PAGE_SIZE..][..PAGE_SIZE]);
            Ok(true)
        };
        let mut c = FileCheck::new(0, start);
        c.check(0, &data, reread).unwrap();
        assert_eq!(c.finish(), (vec![4], 0));

        // Fed in two chunks, the page numbers go on.
        let mut c = FileCheck::new(0, start);
        c.check(0, &data[..2 * PAGE_SIZE], reread).unwrap();
        c.check(2, &data[2 * PAGE_SIZE..], reread).unwrap();
        assert_eq!(c.finish(), (vec![4], 0));

        // As segment file .1, page 3 is block 131075: wrong too.
        let mut c = FileCheck::new(1, start);
        c.check(0, &data, reread).unwrap();
        assert_eq!(c.finish(), (vec![3, 4], 0));
        assert_eq!(pg_checksum_page(heap, PAGES_PER_SEGMENT + 3), pg_checksum_page(heap, 131_075));

        // A page that fails but reads back valid was read torn: no error;
        // nor when the file no longer holds it; a second failure counts.
        let mut bad = heap.to_vec();
        bad[6000] ^= 0x10;
        let mut c = FileCheck::new(0, start);
        c.check(3, &bad, |_, buf: &mut [u8]| {
            buf.copy_from_slice(heap);
            Ok(true)
        })
        .unwrap();
        c.check(3, &bad, |_, _: &mut [u8]| Ok(false)).unwrap();
        assert_eq!(c.finish(), (vec![], 0));
        let mut c = FileCheck::new(0, start);
        c.check(3, &bad, |_, buf: &mut [u8]| {
            buf.copy_from_slice(&bad);
            Ok(true)
        })
        .unwrap();
        assert_eq!(c.finish(), (vec![3], 0));
        let mut c = FileCheck::new(0, start);
        let e = c.check(3, &bad, |_, _: &mut [u8]| Err(io::Error::other("disk"))).unwrap_err();
        assert_eq!(e.to_string(), "disk");
    }

    #[test]
    fn file_check_caps_the_list() {
        let (heap, blkno, _) = PAGES[0];
        let mut bad = heap.to_vec();
        bad[6000] ^= 0x10;
        let mut c = FileCheck::new(0, Lsn(u64::MAX));
        for _ in 0..MAX_LISTED + 5 {
            c.check(u64::from(blkno), &bad, |_, buf: &mut [u8]| {
                buf.copy_from_slice(&bad);
                Ok(true)
            })
            .unwrap();
        }
        let (listed, unlisted) = c.finish();
        assert_eq!((listed.len(), unlisted), (MAX_LISTED, 5));
    }
}
