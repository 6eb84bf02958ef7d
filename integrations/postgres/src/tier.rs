//! `PgTier`: the backend the engine is given, shared by its partitions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use postgres::{Client, NoTls};
use tiered_dedup::exact::{ExactBackend, ExactPartition, PartitionSpec, TierMetric};
use tiered_dedup::ExactTierError;

use crate::config::PgConfig;
use crate::error::{describe_target, PgError};
use crate::partition::PgPartition;
use crate::schema::{self, Names};

/// Counters of a PostgreSQL tier, shared by its partitions.
#[derive(Debug, Default)]
pub struct PgStats {
    /// Requests sent (statements and transactions).
    pub requests: AtomicU64,
    /// Requests that failed.
    pub failures: AtomicU64,
    /// Connections (re)established.
    pub connects: AtomicU64,
    /// Verdicts decided without the database under `FailOpen` or
    /// `FallbackToMemory`.
    pub degraded_decisions: AtomicU64,
    /// Marks (records) the database has stored.
    pub marks_written: AtomicU64,
    /// Marks kept for a retry while the database is unreachable.
    pub marks_unsent: AtomicU64,
    /// Marks dropped because the retry buffer was full.
    pub marks_dropped: AtomicU64,
    /// Ring partitions emptied (`TRUNCATE`) as their slices expired.
    pub partitions_retired: AtomicU64,
    /// The last failure's message (for logs and tests; the verdicts only
    /// say `Unavailable`).
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// What the partitions of one tier share.
pub(crate) struct TierShared {
    pub(crate) config: PgConfig,
    pub(crate) client_config: postgres::Config,
    pub(crate) names: Names,
    pub(crate) stats: Arc<PgStats>,
    /// The slicing this process's engine uses, once a partition has
    /// agreed on it with the database.
    slicing: Mutex<Option<Option<u64>>>,
    agreed: AtomicBool,
    /// The newest slice whose ring partition was emptied (one partition
    /// of one process does it per rotation).
    pub(crate) retired: AtomicU64,
}

impl TierShared {
    /// Stores or checks the slicing (once per process).
    pub(crate) fn agree_slicing(&self, client: &mut Client) -> Result<(), ExactTierError> {
        if self.agreed.load(Ordering::Acquire) {
            return Ok(());
        }
        let slicing = self
            .slicing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or(None);
        schema::agree_slicing(client, &self.names, slicing)
            .map_err(|e| ExactTierError::Unavailable(e.to_string()))?;
        self.agreed.store(true, Ordering::Release);
        Ok(())
    }
}

/// The PostgreSQL exact tier: give it to
/// [`tiered_dedup::DeduperBuilder::exact_tier`] as
/// `ExactTier::Custom(Arc::new(tier))`.
pub struct PgTier {
    shared: Arc<TierShared>,
}

impl std::fmt::Debug for PgTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTier")
            .field("tables", &self.shared.names.label)
            .finish_non_exhaustive()
    }
}

impl PgTier {
    /// Connects once to check everything that can be checked before an
    /// engine uses the tier: the URL, the login, the database, that the
    /// server takes writes, and the tables (created or checked, per
    /// [`PgConfig::schema_action`]). Partitions open their own connections
    /// lazily.
    ///
    /// # Errors
    /// A [`PgError`] that says what to change: a bad URL or name
    /// ([`PgError::Config`]), an unreachable server, a refused login, a
    /// missing database, a read-only server, or tables that are missing
    /// or of another version.
    pub fn connect(config: PgConfig) -> Result<Self, PgError> {
        let (client_config, names, _) = open(&config)?;
        Ok(PgTier {
            shared: Arc::new(TierShared {
                config,
                client_config,
                names,
                stats: Arc::new(PgStats::default()),
                slicing: Mutex::new(None),
                agreed: AtomicBool::new(false),
                retired: AtomicU64::new(0),
            }),
        })
    }

    /// The tier's counters.
    #[must_use]
    pub fn stats(&self) -> Arc<PgStats> {
        Arc::clone(&self.shared.stats)
    }
}

/// Validates `config`, connects, checks the server takes writes, creates
/// or checks the tables: the client, ready.
pub(crate) fn open(config: &PgConfig) -> Result<(postgres::Config, Names, Client), PgError> {
    config.validate()?;
    let client_config = config.client_config()?;
    let mut client = client_config
        .connect(NoTls)
        .map_err(|e| PgError::from_connect(&client_config, e))?;
    schema::check_writable(&mut client, &describe_target(&client_config))?;
    let names = Names::new(config);
    schema::prepare(&mut client, config, &names)?;
    Ok((client_config, names, client))
}

impl ExactBackend for PgTier {
    fn name(&self) -> &'static str {
        "postgres"
    }

    /// The [`PgStats`] counters as `tiered_dedup_postgres_*` series.
    fn report_metrics(&self, report: &mut dyn FnMut(TierMetric)) {
        let s = &self.shared.stats;
        let counters = [
            ("tiered_dedup_postgres_requests_total", &s.requests),
            ("tiered_dedup_postgres_failures_total", &s.failures),
            ("tiered_dedup_postgres_connects_total", &s.connects),
            (
                "tiered_dedup_postgres_degraded_decisions_total",
                &s.degraded_decisions,
            ),
            (
                "tiered_dedup_postgres_marks_written_total",
                &s.marks_written,
            ),
            (
                "tiered_dedup_postgres_marks_dropped_total",
                &s.marks_dropped,
            ),
            (
                "tiered_dedup_postgres_partitions_retired_total",
                &s.partitions_retired,
            ),
        ];
        for (name, value) in counters {
            report(TierMetric::Counter {
                name,
                value: value.load(Ordering::Relaxed),
            });
        }
        report(TierMetric::Gauge {
            name: "tiered_dedup_postgres_marks_unsent",
            value: s.marks_unsent.load(Ordering::Relaxed) as f64,
        });
    }

    fn partition(&self, spec: &PartitionSpec) -> Box<dyn ExactPartition> {
        {
            let mut slicing = self
                .shared
                .slicing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if slicing.is_none() {
                *slicing = Some(spec.slice_nanos);
            }
        }
        Box::new(PgPartition::new(Arc::clone(&self.shared), spec))
    }
}
