//! Page-level deltas: what an incremental or differential backup stores
//! for a relation file that the prior backup already holds.
//!
//! A delta object, once decompressed, is a sequence of page records:
//! `page number (u32 LE) | length (u32 LE) | bytes`, the length being
//! [`PAGE_SIZE`] except for a trailing partial page. Restoring a file
//! writes the prior backup's copy, then each delta of the chain in order,
//! each page at `number * PAGE_SIZE`, then cuts the file to its size.
//!
//! Which pages go in (see [`page_changed`]): those whose `pd_lsn` is at or
//! after the prior backup's start LSN, and every page that cannot be judged
//! by its LSN (new pages with LSN 0, a trailing partial page). Why that is
//! enough is written down in `docs/incremental.md`.

use std::io::{self, Read, Write};

use crate::types::Lsn;

/// PostgreSQL's block size (the only one pgkeep supports).
pub const PAGE_SIZE: usize = 8192;

/// The `pd_lsn` of a page: its first 8 bytes, high word then low word.
pub fn page_lsn(page: &[u8]) -> Lsn {
    let hi = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
    let lo = u32::from_le_bytes([page[4], page[5], page[6], page[7]]);
    Lsn((u64::from(hi) << 32) | u64::from(lo))
}

/// Whether a page must be stored in a delta against a backup that started
/// at `since`.
pub fn page_changed(page: &[u8], since: Lsn) -> bool {
    if page.len() < PAGE_SIZE {
        return true;
    }
    let lsn = page_lsn(page);
    lsn.0 == 0 || lsn >= since
}

/// Writes one page record.
pub fn write_record(w: &mut impl Write, number: u32, page: &[u8]) -> io::Result<()> {
    w.write_all(&number.to_le_bytes())?;
    w.write_all(&(page.len() as u32).to_le_bytes())?;
    w.write_all(page)
}

/// Reads the next page record into `buf`; `None` at the end.
pub fn read_record(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<u32>> {
    let mut head = [0u8; 8];
    match r.read(&mut head[..1])? {
        0 => return Ok(None),
        _ => r.read_exact(&mut head[1..])?,
    }
    let number = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    if len > PAGE_SIZE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("page record of {len} bytes")));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(Some(number))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(lsn: u64) -> Vec<u8> {
        let mut p = vec![7u8; PAGE_SIZE];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p
    }

    #[test]
    fn pages_changed_since_the_prior_start_are_kept() {
        let since = Lsn(0x1_0000_0000);
        assert_eq!(page_lsn(&page(0x1_0000_0028)), Lsn(0x1_0000_0028));
        assert!(page_changed(&page(0x1_0000_0000), since));
        assert!(page_changed(&page(0x2_0000_0000), since));
        assert!(!page_changed(&page(0xFFFF_FFFF), since));
        assert!(page_changed(&page(0), since), "a new page has no LSN to judge by");
        assert!(page_changed(&page(5)[..100], since), "a partial page is always kept");
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        write_record(&mut out, 3, &page(9)).unwrap();
        write_record(&mut out, 70000, &[1, 2, 3]).unwrap();
        let mut r = &out[..];
        let mut buf = Vec::new();
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), Some(3));
        assert_eq!(buf, page(9));
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), Some(70000));
        assert_eq!(buf, [1, 2, 3]);
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), None);
        assert!(read_record(&mut &out[..5], &mut buf).is_err(), "a cut record is an error");
    }
}
