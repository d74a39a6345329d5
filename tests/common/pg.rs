//! The test side of PostgreSQL: a fresh database per test on the server that
//! `VYORA_TEST_PG_URL` names, dropped when the test ends.

/// The server the PostgreSQL tests use.
pub fn server_url() -> String {
    std::env::var("VYORA_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

/// The server's address, for a proxy in front of it.
pub fn server_addr() -> std::net::SocketAddr {
    let url = reqwest::Url::parse(&server_url()).expect("VYORA_TEST_PG_URL is a URL");
    let host = match url.host_str() {
        None | Some("localhost") => "127.0.0.1",
        Some(host) => host,
    };
    format!("{host}:{}", url.port().unwrap_or(5432))
        .parse()
        .expect("VYORA_TEST_PG_URL names a host by its IP address")
}

/// A database of its own for one test.
pub struct TestDb {
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("vyora_test_{:016x}", fastrand::u64(..));
        let (client, connection) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
            .await
            .expect("the test server answers (VYORA_TEST_PG_URL)");
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let mut url = reqwest::Url::parse(&server_url()).expect("VYORA_TEST_PG_URL is a URL");
        url.set_path(&name);
        TestDb {
            url: url.to_string(),
            name,
        }
    }

    /// A connection for looking at (or tampering with) the rows, in the router's schema.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
            .batch_execute("SET search_path TO vyora_router")
            .await
            .expect("set the search path");
        client
    }

    /// The store's settings for this database.
    pub fn postgres(&self, pool_size: usize) -> vyora_router::config::PostgresConfig {
        let mut pg =
            vyora_router::config::PostgresConfig::from_url(&self.url).expect("a PostgreSQL URL");
        pg.pool_size = pool_size;
        pg
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect("count query")
            .get(0)
    }

    /// This database's URL pointed at another address (a proxy in front of the server).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let mut url = reqwest::Url::parse(&self.url).expect("URL");
        url.set_ip_host(addr.ip()).expect("host");
        url.set_port(Some(addr.port())).expect("port");
        url.to_string()
    }

    /// The `[store]` lines that point a router at this database.
    pub fn store_toml(&self, extra: &str) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\n{extra}",
            self.url
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime that could be awaited: a thread with its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
                        .await
                        .ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}
