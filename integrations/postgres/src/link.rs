//! `Link`: one connection of a partition, opened lazily, dropped on a
//! failure, reopened after an exponential backoff (10 ms … 1 s, failing
//! fast meanwhile), with its prepared statements cached.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, GenericClient, NoTls, Statement};
use tiered_dedup::ExactTierError;

use crate::tier::TierShared;

pub(crate) struct Link {
    tier: Arc<TierShared>,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    retry_at: Instant,
    backoff: Duration,
}

/// A database error as the engine's error.
pub(crate) fn unavailable(e: &postgres::Error) -> ExactTierError {
    ExactTierError::Unavailable(format!("PostgreSQL: {e}"))
}

impl Link {
    pub(crate) fn new(tier: Arc<TierShared>) -> Self {
        Link {
            tier,
            client: None,
            statements: HashMap::new(),
            retry_at: Instant::now(),
            backoff: Duration::from_millis(10),
        }
    }

    /// Connects unless connected (or backing off); agrees on the slicing
    /// once per process.
    pub(crate) fn connect(&mut self) -> Result<(), ExactTierError> {
        if self.client.is_some() {
            return Ok(());
        }
        if Instant::now() < self.retry_at {
            return Err(ExactTierError::Unavailable(
                "PostgreSQL: reconnect backoff".to_owned(),
            ));
        }
        let opened = self
            .tier
            .client_config
            .connect(NoTls)
            .map_err(|e| unavailable(&e))
            .and_then(|mut c| {
                self.tier.agree_slicing(&mut c)?;
                Ok(c)
            });
        match opened {
            Ok(c) => {
                self.tier.stats.connects.fetch_add(1, Ordering::Relaxed);
                self.client = Some(c);
                self.statements.clear();
                self.backoff = Duration::from_millis(10);
                Ok(())
            }
            Err(e) => {
                self.record(&e);
                self.failed();
                Err(e)
            }
        }
    }

    /// Keeps `e` as the tier's last error.
    fn record(&self, e: &ExactTierError) {
        if let Ok(mut last) = self.tier.stats.last_error.lock() {
            *last = Some(e.to_string());
        }
    }

    /// Drops the connection after a failure and backs off.
    pub(crate) fn failed(&mut self) {
        self.client = None;
        self.statements.clear();
        self.tier.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
    }

    /// Runs `f` with the client and a statement cache, connecting first; a
    /// failure drops the connection.
    pub(crate) fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Client, &mut Prepared<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, ExactTierError> {
        self.connect()?;
        self.tier.stats.requests.fetch_add(1, Ordering::Relaxed);
        let client = self.client.as_mut().expect("connected above");
        let mut prepared = Prepared {
            statements: &mut self.statements,
        };
        match f(client, &mut prepared) {
            Ok(v) => Ok(v),
            Err(e) => {
                let err = unavailable(&e);
                self.record(&err);
                self.failed();
                Err(err)
            }
        }
    }
}

/// A connection's prepared statements, by text.
pub(crate) struct Prepared<'a> {
    statements: &'a mut HashMap<String, Statement>,
}

impl Prepared<'_> {
    /// The statement `sql` on `client`, prepared once per connection.
    pub(crate) fn get<C: GenericClient>(
        &mut self,
        client: &mut C,
        sql: &str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql)?;
        if self.statements.len() >= 256 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}
