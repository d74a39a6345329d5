//! Sinks waiting for their destination on PostgreSQL: one row per paused sink, written by
//! whichever replica saw the destination down last, for `deliveries list`.

use super::db::Db;
use crate::store::StoreError;
use crate::store::operator::SinkPause;

pub(super) async fn record(
    db: &Db,
    sink: &str,
    pause: Option<&SinkPause>,
) -> Result<(), StoreError> {
    let client = db.get().await?;
    match pause {
        Some(p) => {
            client
                .execute(
                    &db.sql(
                        "INSERT INTO {schema}.pauses (sink, until, reason) VALUES ($1, $2, $3)
                         ON CONFLICT (sink) DO UPDATE SET until = $2, reason = $3",
                    ),
                    &[&sink, &p.until, &p.reason],
                )
                .await?
        }
        None => {
            client
                .execute(
                    &db.sql("DELETE FROM {schema}.pauses WHERE sink = $1"),
                    &[&sink],
                )
                .await?
        }
    };
    Ok(())
}

pub(super) async fn list(db: &Db) -> Result<Vec<SinkPause>, StoreError> {
    let rows = db
        .get()
        .await?
        .query(
            &db.sql("SELECT sink, until, reason FROM {schema}.pauses ORDER BY sink"),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SinkPause {
            sink: r.get(0),
            until: r.get(1),
            reason: r.get(2),
        })
        .collect())
}
