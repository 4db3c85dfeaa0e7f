//! Talking to PostgreSQL: one connection, the queries the engine needs, and
//! the WAL page header check that tells one cluster's WAL from another's.

pub mod checksum;

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::StanzaOptions;
use crate::error::{Error, Result};
use crate::types::{Lsn, SystemId, TimelineId};

/// A connection to the stanza's server.
pub struct Pg {
    client: Client,
    /// `host:port` for messages.
    pub describe: String,
}

/// What `pg_backup_start` returned.
#[derive(Debug, Clone)]
pub struct BackupStart {
    /// Redo LSN of the backup checkpoint.
    pub lsn: Lsn,
    /// Timeline at start.
    pub timeline: TimelineId,
    /// Next xid (snapshot xmin) at start.
    pub xid: u64,
}

/// What `pg_backup_stop` returned.
#[derive(Debug, Clone)]
pub struct BackupStop {
    /// End LSN of the backup.
    pub lsn: Lsn,
    /// Content for `backup_label`.
    pub label_file: String,
    /// Content for `tablespace_map`, if there are tablespaces.
    pub tablespace_map: Option<String>,
    /// Next xid (snapshot xmax) after stop.
    pub xid: u64,
}

impl Pg {
    /// Connects as configured; the error says which server and what to check.
    pub async fn connect(opts: &StanzaOptions) -> Result<Pg> {
        let host = opts.pg_host.clone().unwrap_or_else(|| "/var/run/postgresql".into());
        let port = opts.pg_port.unwrap_or(5432);
        let user = opts.pg_user.clone().unwrap_or_else(|| "postgres".into());
        let db = opts.pg_database.clone().unwrap_or_else(|| "postgres".into());
        let describe = format!("{host}:{port}");
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&host).port(port).user(&user).dbname(&db).application_name("pgkeep").connect_timeout(Duration::from_secs(10));
        let (client, conn) = cfg.connect(NoTls).await.map_err(|e| {
            Error::Input(format!(
                "cannot connect to PostgreSQL at {describe} as user {user}: {}; check that the server runs and pg-host/pg-port/pg-user",
                crate::error::one_line(&e)
            ))
        })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Pg { client, describe })
    }

    fn err(&self, what: &str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        Error::postgres(format!("PostgreSQL at {} failed to {what}", self.describe))
    }

    async fn one_text(&self, sql: &str, what: &str) -> Result<String> {
        let row = self.client.query_one(sql, &[]).await.map_err(self.err(what))?;
        Ok(row.get::<_, String>(0))
    }

    /// The cluster's system identifier.
    pub async fn system_id(&self) -> Result<SystemId> {
        self.one_text("SELECT system_identifier::text FROM pg_control_system()", "report its system identifier").await?.parse()
    }

    /// `server_version_num`.
    pub async fn version_num(&self) -> Result<u32> {
        let v = self.one_text("SELECT current_setting('server_version_num')", "report its version").await?;
        v.parse().map_err(|_| Error::Input(format!("unexpected server_version_num '{v}'")))
    }

    /// WAL segment size in bytes.
    pub async fn wal_segment_size(&self) -> Result<u64> {
        let v = self.one_text("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'", "report wal_segment_size").await?;
        v.parse().map_err(|_| Error::Input(format!("unexpected wal_segment_size '{v}'")))
    }

    /// A setting's current value.
    pub async fn setting(&self, name: &str) -> Result<String> {
        let row = self.client.query_one("SELECT current_setting($1)", &[&name]).await.map_err(self.err("report settings"))?;
        Ok(row.get(0))
    }

    /// Whether the cluster has data checksums on (`initdb -k` or
    /// `pg_checksums --enable`): `current_setting('data_checksums')`.
    pub async fn data_checksums(&self) -> Result<bool> {
        let v = self.setting("data_checksums").await?;
        match v.as_str() {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(Error::Input(format!("unexpected data_checksums '{v}' from the server at {}", self.describe))),
        }
    }

    /// The server's data directory.
    pub async fn data_directory(&self) -> Result<String> {
        self.setting("data_directory").await
    }

    /// Whether the server is a standby.
    pub async fn in_recovery(&self) -> Result<bool> {
        let row = self.client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(self.err("report recovery state"))?;
        Ok(row.get(0))
    }

    /// Tablespaces other than the built-in ones: (oid, name, location).
    pub async fn tablespaces(&self) -> Result<Vec<(u32, String, String)>> {
        let rows = self
            .client
            .query(
                "SELECT oid::int8, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace WHERE pg_tablespace_location(oid) <> '' ORDER BY oid",
                &[],
            )
            .await
            .map_err(self.err("list tablespaces"))?;
        Ok(rows.iter().map(|r| (r.get::<_, i64>(0) as u32, r.get(1), r.get(2))).collect())
    }

    /// Starts a non-exclusive backup on this connection (fast checkpoint).
    pub async fn backup_start(&self, label: &str) -> Result<BackupStart> {
        let row = self
            .client
            .query_one(
                "SELECT lsn::text, (SELECT timeline_id::int8 FROM pg_control_checkpoint()), pg_snapshot_xmin(pg_current_snapshot())::text::int8 \
                 FROM pg_backup_start($1, true) AS lsn",
                &[&label],
            )
            .await
            .map_err(self.err("start the backup (pg_backup_start)"))?;
        Ok(BackupStart {
            lsn: row.get::<_, String>(0).parse()?,
            timeline: TimelineId(row.get::<_, i64>(1) as u32),
            xid: row.get::<_, i64>(2) as u64,
        })
    }

    /// Stops the backup. PostgreSQL switches to a new WAL segment but does
    /// not wait for the archiver here: the caller waits for the segments in
    /// the repository itself, with a timeout and a clear error, instead of
    /// hanging when archiving is broken.
    pub async fn backup_stop(&self) -> Result<BackupStop> {
        let row = self
            .client
            .query_one("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)", &[])
            .await
            .map_err(self.err("stop the backup (pg_backup_stop)"))?;
        let map: Option<String> = row.get(2);
        let xid = self
            .client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8", &[])
            .await
            .map_err(self.err("report the next transaction id"))?;
        Ok(BackupStop {
            lsn: row.get::<_, String>(0).parse()?,
            label_file: row.get(1),
            tablespace_map: map.filter(|m| !m.is_empty()),
            xid: xid.get::<_, i64>(0) as u64,
        })
    }

    /// Writes a restore point and switches WAL; returns the name of the
    /// segment that was completed.
    pub async fn switch_wal(&self) -> Result<String> {
        self.client
            .query_one("SELECT pg_create_restore_point('pgkeep archive check')::text", &[])
            .await
            .map_err(self.err("create a restore point"))?;
        self.one_text("SELECT pg_walfile_name(pg_switch_wal())", "switch WAL (pg_switch_wal)").await
    }

    /// The timeline WAL is inserted on and the insert position
    /// (`pg_walfile_name` names the segment with the insert timeline,
    /// which after a promotion is the new one even before the first
    /// checkpoint on it).
    pub async fn wal_position(&self) -> Result<(TimelineId, Lsn)> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())", &[])
            .await
            .map_err(self.err("report its WAL position"))?;
        let name: String = row.get(1);
        let timeline = name
            .get(..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .ok_or_else(|| Error::Input(format!("unexpected WAL file name '{name}' from the server at {}", self.describe)))?;
        Ok((TimelineId(timeline), row.get::<_, String>(0).parse()?))
    }

    /// Current WAL insert position.
    pub async fn current_lsn(&self) -> Result<Lsn> {
        self.one_text("SELECT pg_current_wal_lsn()::text", "report its WAL position").await?.parse()
    }
}

/// Reads the system identifier from the long page header at the start of
/// a WAL segment (`XLogLongPageHeaderData.xlp_sysid`). `None` when the data
/// does not start with a long page header.
pub fn wal_system_id(segment: &[u8]) -> Option<SystemId> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    if segment.len() < 40 {
        return None;
    }
    let info = u16::from_le_bytes([segment[2], segment[3]]);
    if info & XLP_LONG_HEADER == 0 {
        return None;
    }
    let id = u64::from_le_bytes(segment[24..32].try_into().ok()?);
    Some(SystemId(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_system_id_of_a_long_page_header() {
        let mut page = vec![0u8; 8192];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
        page[24..32].copy_from_slice(&7_301_234_567_890_123_456u64.to_le_bytes());
        assert_eq!(wal_system_id(&page), Some(SystemId(7_301_234_567_890_123_456)));
        page[2] = 0;
        assert_eq!(wal_system_id(&page), None);
        assert_eq!(wal_system_id(&page[..10]), None);
    }
}
