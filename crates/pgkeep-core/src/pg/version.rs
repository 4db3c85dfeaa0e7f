//! What differs between the PostgreSQL majors pgkeep supports, in one
//! table. Code asks [`Major`] instead of comparing version numbers; each
//! fact names where PostgreSQL defines it (branch `REL_<major>_STABLE`),
//! and `docs/postgresql-versions.md` says what each change means for a
//! backup. A major not in [`SUPPORTED`] is refused by [`of_version`].

use crate::error::{Error, Result};

/// One PostgreSQL major and the facts of it a physical backup depends on.
#[derive(Debug, PartialEq, Eq)]
pub struct Major {
    /// The major number (`server_version_num / 10000`).
    pub major: u32,
    /// `XLOG_PAGE_MAGIC` (`src/include/access/xlog_internal.h`): the first
    /// two bytes of every WAL page; it changes with every major whose WAL
    /// format changed, and did for each of 15 to 18.
    pub wal_page_magic: u16,
    /// `PG_CONTROL_VERSION` (`src/include/catalog/pg_control.h`): the
    /// second field of `global/pg_control`, after the system identifier.
    pub control_version: u32,
    /// `CATALOG_VERSION_NO` (`src/include/catalog/catversion.h`), the
    /// third field of `global/pg_control`: fixed for a released major, and
    /// what tells 15 from 16, whose control files are otherwise alike.
    pub catalog_version: u32,
    /// Where `ControlFileData.crc` lies: the CRC-32C of every byte before
    /// it (`offsetof(ControlFileData, crc)`). 18 added
    /// `default_char_signedness` before it.
    pub control_crc_offset: usize,
    /// Whether `initdb` turns data checksums on unless given
    /// `--no-data-checksums` (18: `src/bin/initdb/initdb.c`,
    /// `static bool data_checksums = true`).
    pub checksums_by_default: bool,
    /// Whether the server keeps WAL summaries in `pg_wal/summaries` (17:
    /// `src/backend/postmaster/walsummarizer.c`; `pg_basebackup` sends the
    /// directory empty, and `ValidateXLOGDirectoryStructure` in
    /// `src/backend/access/transam/xlog.c` makes it at startup if missing).
    pub wal_summaries: bool,
}

/// Every major pgkeep supports, oldest first. 19 (`REL_19_STABLE`) is not
/// among them yet: adding it is a row here, once its facts are checked.
pub const SUPPORTED: [Major; 4] = [
    Major {
        major: 15,
        wal_page_magic: 0xD110,
        control_version: 1300,
        catalog_version: 202209061,
        control_crc_offset: 288,
        checksums_by_default: false,
        wal_summaries: false,
    },
    Major {
        major: 16,
        wal_page_magic: 0xD113,
        control_version: 1300,
        catalog_version: 202307071,
        control_crc_offset: 288,
        checksums_by_default: false,
        wal_summaries: false,
    },
    Major {
        major: 17,
        wal_page_magic: 0xD116,
        control_version: 1700,
        catalog_version: 202406281,
        control_crc_offset: 288,
        checksums_by_default: false,
        wal_summaries: true,
    },
    Major {
        major: 18,
        wal_page_magic: 0xD118,
        control_version: 1800,
        catalog_version: 202506291,
        control_crc_offset: 292,
        checksums_by_default: true,
        wal_summaries: true,
    },
];

/// `pg_wal` and the directories under it a backup keeps, empty, as
/// `pg_basebackup` sends them (`src/backend/backup/basebackup.c`,
/// `sendDir`): `archive_status`, and `summaries` where it exists (17).
const WAL_DIRS: [&str; 3] = ["pg_wal", "pg_wal/archive_status", "pg_wal/summaries"];

/// The directories under `pg_wal` a backup keeps ([`WAL_DIRS`] but `pg_wal`).
pub const WAL_SUBDIRS: &[&str] = WAL_DIRS.split_at(1).1;

/// The WAL directories a restored data directory has, empty, for a backup
/// of `server_version_num` `pg_version`: `pg_wal/archive_status`, and from
/// 17 `pg_wal/summaries`. The summaries of the directory a delta restore
/// rewrites describe WAL of another history and go.
pub fn wal_dirs(pg_version: u32) -> &'static [&'static str] {
    if of_version(pg_version).is_ok_and(|m| m.wal_summaries) {
        &WAL_DIRS
    } else {
        WAL_DIRS.split_at(2).0
    }
}

/// "15, 16, 17 and 18".
pub fn supported_list() -> String {
    let all: Vec<String> = SUPPORTED.iter().map(|m| m.major.to_string()).collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => all.concat(),
    }
}

/// The major of `server_version_num` (e.g. 170004), refused in one line
/// when pgkeep does not support it.
pub fn of_version(version_num: u32) -> Result<&'static Major> {
    of_major(version_num / 10000)
}

/// [`Major`] `major`, refused in one line when pgkeep does not support it.
pub fn of_major(major: u32) -> Result<&'static Major> {
    SUPPORTED
        .iter()
        .find(|m| m.major == major)
        .ok_or_else(|| Error::Refused(format!("PostgreSQL {major} is not supported: pgkeep supports PostgreSQL {}", supported_list())))
}

/// The major whose WAL pages start with `magic`, if pgkeep supports it.
pub fn of_wal_magic(magic: u16) -> Option<&'static Major> {
    SUPPORTED.iter().find(|m| m.wal_page_magic == magic)
}

/// The page magic of a WAL segment's first page (`xlp_magic`, the first
/// field of `XLogPageHeaderData` in every major).
pub fn wal_page_magic(segment: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(segment.get(..2)?.try_into().ok()?))
}

/// Checks that WAL segment `segment` is of the major of `server_version_num`
/// `pg_version` by its page magic; `what` names it in the refusal. A system
/// recorded under a major the table does not know (before pgkeep checked
/// majors) is not judged by its magic.
pub fn check_wal_major(segment: &[u8], pg_version: u32, what: &str) -> Result<()> {
    let Ok(expected) = of_version(pg_version) else { return Ok(()) };
    let magic = wal_page_magic(segment).unwrap_or(0);
    if magic == expected.wal_page_magic {
        return Ok(());
    }
    Err(Error::Refused(match of_wal_magic(magic) {
        Some(other) => format!(
            "{what} is PostgreSQL {}'s WAL (page magic 0x{magic:04X}) but the stanza's system is PostgreSQL {}; is this the right stanza?",
            other.major, expected.major
        ),
        None => format!(
            "{what} has WAL page magic 0x{magic:04X}, which no PostgreSQL pgkeep supports has ({} expects 0x{:04X}); is it a WAL segment?",
            expected.major, expected.wal_page_magic
        ),
    }))
}

/// The major that wrote `global/pg_control` `control`, by its
/// `pg_control_version`, `catalog_version_no` and CRC; `None` when it is
/// truncated, of a major pgkeep does not support, or fails its CRC (a torn
/// or foreign file).
pub fn of_control_file(control: &[u8]) -> Option<&'static Major> {
    let field = |at: usize| Some(u32::from_le_bytes(control.get(at..at + 4)?.try_into().ok()?));
    let (version, catalog) = (field(8)?, field(12)?);
    SUPPORTED.iter().filter(|m| m.control_version == version && m.catalog_version == catalog).find(|m| control_is_valid(control, m))
}

/// Whether `control` is a whole control file of `major`: its
/// `pg_control_version`, and the CRC over what precedes `crc`. The
/// catalog version is not asked for: it moves during a release's betas.
pub fn control_is_valid(control: &[u8], major: &Major) -> bool {
    let at = major.control_crc_offset;
    let field = |at: usize| control.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    field(8) == Some(major.control_version) && field(at).is_some() && field(at) == control.get(..at).map(crc32c)
}

/// CRC-32C (Castagnoli), as PostgreSQL's `COMP_CRC32C` (reflected, initial
/// and final value all ones). Bitwise: it runs over a few hundred bytes.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 512 bytes of `global/pg_control` as each major's `initdb`
    /// wrote it (`testdata/pg_control.<major>`).
    fn control(major: u32) -> Vec<u8> {
        let path = format!("{}/src/pg/testdata/pg_control.{major}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn each_majors_control_file_is_recognised_by_its_version_and_crc() {
        for m in &SUPPORTED {
            let c = control(m.major);
            assert_eq!(of_control_file(&c).map(|m| m.major), Some(m.major));
            // One flipped bit anywhere the CRC covers: not trusted.
            let mut torn = c.clone();
            torn[40] ^= 1;
            assert_eq!(of_control_file(&torn), None, "major {}", m.major);
            assert_eq!(of_control_file(&c[..100]), None);
        }
    }

    /// A beta's catalog version is not the release's: the file is still a
    /// valid control file of its major, only not identified by
    /// [`of_control_file`].
    #[test]
    fn a_control_file_with_another_catalog_version_is_still_valid_for_its_major() {
        let mut c = control(18);
        c[12..16].copy_from_slice(&202505071u32.to_le_bytes());
        let at = of_major(18).unwrap().control_crc_offset;
        let crc = crc32c(&c[..at]);
        c[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(control_is_valid(&c, of_major(18).unwrap()));
        assert!(!control_is_valid(&c, of_major(17).unwrap()));
        assert_eq!(of_control_file(&c), None);
    }

    #[test]
    fn majors_outside_the_table_are_refused_in_one_line_naming_the_supported() {
        assert_eq!(supported_list(), "15, 16, 17 and 18");
        for v in [140010, 190000, 90624] {
            let e = of_version(v).unwrap_err().to_string();
            assert!(e.contains("is not supported: pgkeep supports PostgreSQL 15, 16, 17 and 18") && !e.contains('\n'), "{e}");
        }
        assert_eq!(of_version(170004).unwrap().major, 17);
    }

    #[test]
    fn wal_of_another_major_is_refused_naming_both() {
        let mut page = vec![0u8; 64];
        page[..2].copy_from_slice(&0xD113u16.to_le_bytes());
        let sixteen = 160014;
        check_wal_major(&page, sixteen, "WAL file 000000010000000000000001").unwrap();
        let e = check_wal_major(&page, 150018, "WAL file X").unwrap_err().to_string();
        assert!(e.contains("PostgreSQL 16's WAL (page magic 0xD113)") && e.contains("stanza's system is PostgreSQL 15"), "{e}");
        page[..2].copy_from_slice(&0xD101u16.to_le_bytes());
        let e = check_wal_major(&page, sixteen, "WAL file X").unwrap_err().to_string();
        assert!(e.contains("0xD101") && e.contains("0xD113"), "{e}");
        // A system recorded under a major the table does not know is not
        // judged by its magic.
        check_wal_major(&page, 140010, "WAL file X").unwrap();
        // Every major's magic is its own.
        for m in &SUPPORTED {
            assert_eq!(of_wal_magic(m.wal_page_magic), Some(m));
        }
    }
}
