//! The store's handle on PostgreSQL that every part of the engine uses: the connection
//! pool, and the schema and channel names its statements and notifications use.

use std::sync::Arc;

use deadpool_postgres::{Object, Pool, PoolError};

use super::schema;

/// The connections, and the schema every statement names its tables in. Names are
/// qualified rather than left to each connection's `search_path`, which PgBouncer's
/// transaction pooling would not keep.
#[derive(Clone)]
pub(super) struct Db {
    pub(super) pool: Pool,
    /// `store.schema`, quoted (`"vyora_router"`).
    schema: Arc<str>,
    /// The `LISTEN/NOTIFY` channel, named after the schema, so routers on other schemas
    /// of the database do not wake each other; a notification's payload names the sinks.
    pub(super) channel: Arc<str>,
}

impl Db {
    pub(super) fn new(pool: Pool, schema: &str) -> Db {
        Db {
            pool,
            schema: schema::quote(schema).into(),
            channel: schema.into(),
        }
    }

    /// `template` with each `{schema}` replaced by the schema's quoted name.
    pub(super) fn sql(&self, template: &str) -> String {
        template.replace("{schema}", &self.schema)
    }

    pub(super) async fn get(&self) -> Result<Object, PoolError> {
        self.pool.get().await
    }
}
