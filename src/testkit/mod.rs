//! Test kit: a private database per test, a scriptable mock receiver, and an in-process
//! Switchyard. Used by `tests/` and by destination authors (see `destinations/README.md`).
//!
//! The mock records every request and answers as scripted: 200, any status with headers (a 429
//! with `Retry-After`), after a delay, or never (a hung vendor).

mod client;
pub mod conformance;
mod mock;
mod process;

pub use client::{admin, admin_ok, send_batch};
pub use mock::{MockServer, Received, Reply};
pub use process::{assert_quiet_when_its_reader_has_gone, closed_pipe, PrivateCluster, Process};

use std::time::Duration;

use crate::cli::serve::{self, Role, Running};
use crate::store;

/// The server every test database lives on.
pub fn server_url() -> String {
    std::env::var("SWITCHYARD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database of its own for one test, dropped when the value is.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// A fresh, empty database named after `label`.
    pub async fn create(label: &str) -> TestDatabase {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("sy_test_{}_{}", sanitize(label), &suffix[..8]);
        let maintenance = [format!("{}/postgres", server_url())];
        if store::server::create_database(&maintenance, &name)
            .await
            .is_err()
        {
            panic!("creating the test database (the test Postgres must answer: see README, .ci/test starts it)");
        }
        let url = format!("{}/{name}", server_url());
        TestDatabase { name, url }
    }

    /// A URL for this database that names nothing yet: Switchyard must create it.
    pub fn uncreated(label: &str) -> TestDatabase {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("sy_test_{}_{}", sanitize(label), &suffix[..8]);
        let url = format!("{}/{name}", server_url());
        TestDatabase { name, url }
    }

    /// Runs one query and returns the first column of the first row as text.
    pub async fn scalar(&self, sql: &str) -> Option<String> {
        store::server::query_text(&self.url, sql)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async code: a short-lived runtime on its own thread does the work.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let maintenance = format!("{}/postgres", server_url());
            let _ = runtime.block_on(store::server::drop_database(&maintenance, &name));
            Ok::<_, std::io::Error>(())
        })
        .join();
    }
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect()
}

/// Starts Switchyard in this process on a free loopback port.
pub async fn start_switchyard(config_toml: &str, database_url: &str) -> Running {
    start_switchyard_as(config_toml, database_url, Role::All).await
}

/// [`start_switchyard`] with a role.
pub async fn start_switchyard_as(config_toml: &str, database_url: &str, role: Role) -> Running {
    let config = crate::config::parse(config_toml, "test.toml")
        .unwrap_or_else(|errors| panic!("test config is invalid:\n{errors}"));
    start(config, None, database_url, role).await
}

/// Starts Switchyard in this process with its config read from `path` (so it can be reloaded).
pub async fn start_switchyard_from(path: &std::path::Path, database_url: &str) -> Running {
    let config = crate::config::load(path)
        .unwrap_or_else(|errors| panic!("test config is invalid:\n{errors}"));
    start(config, Some(path), database_url, Role::All).await
}

/// Starts Switchyard in this process on a free loopback port, with the test's admin token and
/// short client timeouts.
async fn start(
    config: crate::config::Config,
    config_path: Option<&std::path::Path>,
    database_url: &str,
    role: Role,
) -> Running {
    serve::start(serve::Settings {
        listen: "127.0.0.1:0".into(),
        database_url: Some(database_url.to_owned()),
        config,
        config_path: config_path.map(ToOwned::to_owned),
        role,
        admin_token: Some(ADMIN_TOKEN.into()),
        grace: Duration::from_secs(5),
        timeouts: test_timeouts(),
    })
    .await
    .expect("switchyard starts")
}

/// The admin token [`start_switchyard`] uses.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Short client timeouts, so tests of slow clients finish quickly.
fn test_timeouts() -> crate::http::server::HttpTimeouts {
    crate::http::server::HttpTimeouts {
        headers: Duration::from_secs(2),
        body: Duration::from_secs(2),
    }
}
