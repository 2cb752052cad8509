//! Fleet-wide rate budgets: each provider's requests, input tokens and output tokens per
//! minute, and its calls in flight, shared by every worker through PostgreSQL (migration 0010).
//!
//! A provider's limits belong to its API key, not to a process, so they are kept where every
//! worker already is: one token-bucket row per provider and dimension (`provider_budgets`) and
//! one row per concurrency slot (`provider_slots`). Scaling workers out does not multiply the
//! load on a provider; nothing besides PostgreSQL runs.
//!
//! The call sequence a worker follows around one provider call:
//!
//! ```ignore
//! // Start-up, once per configured provider (several workers at once are fine).
//! budgets.configure("openai", &Limits { rpm: Some(500), input_tpm: Some(200_000),
//!                                       output_tpm: Some(50_000), max_in_flight: Some(64) }).await?;
//!
//! // Before the call: take the request, the prompt's tokens and max_tokens, and a slot.
//! let ask = Ask { input_tokens: estimate, max_output_tokens: max_tokens,
//!                 max_wait: Duration::from_secs(2), hold_for: timeout + Duration::from_secs(10) };
//! let permit = match budgets.take("openai", &ask).await {
//!     Ok(permit) => permit,
//!     // Every slot busy: slots free up as calls end, so wait `after` (IN_FLIGHT_RETRY) in
//!     // process and take again (or snooze, if the worker prefers to let the task go).
//!     Err(TakeError::Wait { reason: WaitReason::InFlight, after, .. }) => { sleep(after); retry }
//!     // Out of budget, or blocked after a 429: snooze the task until `until` (database
//!     // clock, so it can go straight into `scheduled_for`) without using an attempt. Under
//!     // `auto` routing, try the next provider of the tier first: a refused take took nothing.
//!     Err(TakeError::Wait { until, reason, .. }) => return snooze(until, reason),
//!     // More than a whole minute's budget: it can never go. Fail the task.
//!     Err(e @ TakeError::TooLarge { .. }) => return fail_permanently(e),
//!     Err(TakeError::Database(e)) => return retry_later(e),
//! };
//! tokio::time::sleep(permit.delay).await; // a reservation up to `max_wait` ahead; usually 0
//!
//! let response = http_call().await;
//! budgets.observe_headers("openai", |name| response.headers().get(name)?.to_str().ok()).await?;
//! match response {
//!     Ok(usage)  => permit.settle(&budgets, usage.input_tokens, usage.output_tokens).await?,
//!     Err(429)   => { budgets.block_until("openai", retry_at).await?;
//!                     permit.settle_unknown(&budgets).await? }
//!     Err(_)     => permit.settle_unknown(&budgets).await?,   // sent: assume it counted
//! }
//! // Never sent (cancelled while waiting): `permit.give_back(&budgets)` returns everything.
//! ```
//!
//! How a bucket works (every step is one SQL statement, below):
//! - **Refill** is lazy: a statement that touches a bucket first brings it to
//!   `least(burst, tokens + capacity × elapsed / 60 s)`.
//! - **Burst** is [`BURST`] worth of the per-minute capacity (at least 1), not a whole minute:
//!   a bucket holding a minute lets the fleet send a minute's worth in a second, which gets
//!   429s from providers that enforce per-minute limits over shorter periods, and breaks the
//!   "no 10-second window above its share" promise.
//! - **Take** is one conditional `UPDATE … RETURNING` over every dimension: all or nothing.
//!   A call may go when each bucket holds what it asks (or is full, for asks larger than the
//!   burst: the bucket goes into debt and refills from below zero). When the buckets will be
//!   ready within `max_wait`, the take is granted as a reservation: the tokens are taken now
//!   (the level goes below zero), and [`Permit::delay`] says how long to wait before calling.
//!   Callers therefore line up one after the other at exactly the budget's rate instead of
//!   waking together and racing. Beyond `max_wait` nothing is taken and the answer says when
//!   the slowest dimension will be ready.
//! - **Settle** corrects the take with the response's usage: output was taken at
//!   `max_tokens` and the unused part comes back; input was an estimate.
//! - **Headers** only ever lower a bucket, to what the provider says remains.
//! - **Blocked**: after a 429 nothing is taken before `blocked_until`, not even as a
//!   reservation; callers snooze until then.
//! - **Slots** cap calls in flight across the fleet; a slot expires, so a crashed worker's
//!   slots come back by themselves.
//!
//! Lock order: bucket rows in `dimension` order, then slot rows only with `SKIP LOCKED`. No
//! statement waits for a slot row while holding a bucket row, so takes, settles, header
//! observations, blocks and start-up configuration cannot deadlock each other.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{Error, Result};

/// How much of a minute's capacity a bucket holds at most. A quarter of a second keeps any
/// 10-second window within 2.5% of its share while still letting a burst of concurrent calls
/// through without waiting.
pub const BURST: Duration = Duration::from_millis(250);

/// When every slot is busy, how long until the caller should ask again. Slots are freed as
/// calls end, at no predictable moment, so this is a short fixed pause.
pub const IN_FLIGHT_RETRY: Duration = Duration::from_millis(200);

/// The rate dimensions of a provider's budget, as stored in `provider_budgets.dimension`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Requests,
    InputTokens,
    OutputTokens,
}

impl Dimension {
    /// In lock order (alphabetical, the order of the primary key).
    pub const ALL: [Dimension; 3] = [
        Dimension::InputTokens,
        Dimension::OutputTokens,
        Dimension::Requests,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Requests => "requests",
            Dimension::InputTokens => "input_tokens",
            Dimension::OutputTokens => "output_tokens",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

impl std::fmt::Display for Dimension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider's fleet-wide limits, from its `[providers.NAME]` config. `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Input (prompt) tokens per minute.
    pub input_tpm: Option<u64>,
    /// Output (completion) tokens per minute.
    pub output_tpm: Option<u64>,
    /// Calls in flight at once, across every worker.
    pub max_in_flight: Option<u32>,
}

impl Limits {
    fn capacity(&self, dimension: Dimension) -> Option<u64> {
        match dimension {
            Dimension::Requests => self.rpm,
            Dimension::InputTokens => self.input_tpm,
            Dimension::OutputTokens => self.output_tpm,
        }
    }
}

/// What one call asks of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The prompt's estimated input tokens; [`Permit::settle`] corrects it.
    pub input_tokens: u64,
    /// The call's `max_tokens`, taken in full and refunded down to the actual output.
    pub max_output_tokens: u64,
    /// The longest the caller is willing to wait in process: a take that will be ready within
    /// this is granted as a reservation ([`Permit::delay`]); beyond it, refused with a time to
    /// snooze until. Zero = only right now.
    pub max_wait: Duration,
    /// The longest the call can take (its timeout plus a margin): the slot expires this long
    /// after the permit's start, which is how a crashed worker's slots come back.
    pub hold_for: Duration,
}

/// Why a take was refused for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// This dimension's bucket is the last to be ready.
    Budget(Dimension),
    /// The provider answered 429; [`Budgets::block_until`] recorded when to try again.
    Blocked,
    /// Every `max_in_flight` slot is held.
    InFlight,
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitReason::Budget(d) => write!(f, "{d} budget exhausted"),
            WaitReason::Blocked => f.write_str("blocked after a rate-limit response"),
            WaitReason::InFlight => f.write_str("max_in_flight reached"),
        }
    }
}

/// A take that did not grant a permit.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// Nothing was taken. Try again at `until` (database clock; `after` is the same moment
    /// relative to now, for sleeping in process).
    #[error("provider {provider}: {reason}; ready at {until}")]
    Wait {
        provider: String,
        until: DateTime<Utc>,
        after: Duration,
        reason: WaitReason,
    },
    /// The call asks more than the provider allows in a whole minute: it can never go.
    #[error(
        "provider {provider}: the call needs {requested} {dimension} but the fleet-wide budget is {capacity} per minute"
    )]
    TooLarge {
        provider: String,
        dimension: Dimension,
        requested: u64,
        capacity: u64,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a granted take holds until it is settled. Settle it with exactly one of
/// [`settle`](Permit::settle), [`settle_unknown`](Permit::settle_unknown) or
/// [`give_back`](Permit::give_back); a permit dropped without that keeps its tokens (they were
/// spent or not, the bucket refills either way) and its slot until the slot expires.
#[must_use = "settle the permit after the call (or give it back if the call was not made)"]
#[derive(Debug)]
pub struct Permit {
    provider: String,
    input_tokens: u64,
    max_output_tokens: u64,
    /// Wait this long before calling: the permit is a reservation this far ahead. Zero when
    /// the buckets had enough right now.
    pub delay: Duration,
    /// The `max_in_flight` slot held, if the provider has a cap: (slot, holder token).
    slot: Option<(i32, Uuid)>,
}

impl Permit {
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The `max_in_flight` slot this permit holds, if the provider has a cap.
    pub fn slot(&self) -> Option<i32> {
        self.slot.map(|(s, _)| s)
    }

    /// The call was answered with this usage: give back the output not generated (it was taken
    /// at `max_tokens`), correct the input estimate either way, free the slot.
    pub async fn settle(
        self,
        budgets: &Budgets,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Result<()> {
        let input = self.input_tokens as f64 - input_tokens as f64;
        let output = self.max_output_tokens as f64 - output_tokens as f64;
        budgets.settle_permit(&self, [input, output, 0.0]).await
    }

    /// The call was sent but no usage came back (an error, a timeout): the provider may have
    /// counted it, so everything taken stays taken; the slot is freed.
    pub async fn settle_unknown(self, budgets: &Budgets) -> Result<()> {
        budgets.settle_permit(&self, [0.0, 0.0, 0.0]).await
    }

    /// The call was never sent (cancelled while waiting for its turn): everything taken comes
    /// back and the slot is freed.
    pub async fn give_back(self, budgets: &Budgets) -> Result<()> {
        let input = self.input_tokens as f64;
        let output = self.max_output_tokens as f64;
        budgets.settle_permit(&self, [input, output, 1.0]).await
    }
}

/// The fleet-wide budgets, a handle on the pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Budgets {
    pool: PgPool,
}

impl Budgets {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// **Configure** (worker start-up): writes a provider's capacities and slot count. Several
    /// workers configuring at once, or a worker restarting, do not refill or empty a bucket:
    /// an unchanged capacity writes nothing, and a changed one keeps the current level (capped
    /// at the new burst). A dimension that becomes unlimited keeps its row (for
    /// `blocked_until`) without a level.
    ///
    /// Three statements, deliberately not one transaction: deleting surplus slots may wait for
    /// a slot row that a take has locked while that take waits for bucket rows, so this must
    /// not hold bucket rows at that moment.
    pub async fn configure(&self, provider: &str, limits: &Limits) -> Result<()> {
        let mut dimensions = Vec::with_capacity(3);
        let mut capacities: Vec<Option<i64>> = Vec::with_capacity(3);
        let mut bursts: Vec<Option<f64>> = Vec::with_capacity(3);
        for dimension in Dimension::ALL {
            let capacity = match limits.capacity(dimension) {
                Some(0) => {
                    return Err(Error::Config(format!(
                        "provider {provider}: a {dimension} limit of 0 per minute lets nothing through; omit it for unlimited"
                    )));
                }
                Some(c) => Some(i64::try_from(c).map_err(|_| {
                    Error::Config(format!(
                        "provider {provider}: {dimension} limit {c} is too large"
                    ))
                })?),
                None => None,
            };
            dimensions.push(dimension.as_str());
            bursts.push(capacity.map(burst_of));
            capacities.push(capacity);
        }
        if limits.max_in_flight == Some(0) {
            return Err(Error::Config(format!(
                "provider {provider}: max_in_flight = 0 lets no call through; omit it for unlimited"
            )));
        }

        // Upsert the buckets, in lock order. New buckets start full.
        sqlx::query(
            "INSERT INTO provider_budgets AS b (provider, dimension, capacity, burst, tokens, refilled_at)
             SELECT $1, d.dimension, d.capacity, d.burst, d.burst, now()
               FROM unnest($2::text[], $3::bigint[], $4::float8[]) AS d (dimension, capacity, burst)
              ORDER BY d.dimension
             ON CONFLICT (provider, dimension) DO UPDATE
                SET capacity = EXCLUDED.capacity,
                    burst = EXCLUDED.burst,
                    tokens = CASE
                               WHEN EXCLUDED.capacity IS NULL THEN NULL
                               WHEN b.capacity IS NULL THEN EXCLUDED.burst
                               ELSE least(EXCLUDED.burst, b.burst,
                                          b.tokens + b.capacity * extract(epoch FROM now() - b.refilled_at)::float8 / 60.0)
                             END,
                    refilled_at = now()
              WHERE b.capacity IS DISTINCT FROM EXCLUDED.capacity
                 OR b.burst IS DISTINCT FROM EXCLUDED.burst",
        )
        .bind(provider)
        .bind(dimensions)
        .bind(capacities)
        .bind(bursts)
        .execute(&self.pool)
        .await?;

        // Slots 0..max_in_flight exist; any beyond go (a call holding one finishes unhindered,
        // so a lowered cap applies fully once those calls end).
        let slots = i32::try_from(limits.max_in_flight.unwrap_or(0)).map_err(|_| {
            Error::Config(format!("provider {provider}: max_in_flight is too large"))
        })?;
        sqlx::query(
            "INSERT INTO provider_slots (provider, slot)
             SELECT $1, s FROM generate_series(0, $2 - 1) AS s
             ON CONFLICT (provider, slot) DO NOTHING",
        )
        .bind(provider)
        .bind(slots)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM provider_slots WHERE provider = $1 AND slot >= $2")
            .bind(provider)
            .bind(slots)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// **Take** (before a call): one statement takes a request, `input_tokens` and
    /// `max_output_tokens` from the provider's buckets and one `max_in_flight` slot, all or
    /// nothing.
    ///
    /// - `bucket` locks the provider's limited rows in lock order and refills them lazily.
    ///   Waiting for that lock serializes takes per provider; each sees its predecessor's
    ///   result (the locked row is the latest version), so no two takes spend the same tokens.
    /// - `ready`: when each bucket will hold what is asked (or be full, for an ask above its
    ///   burst); `verdict` picks the latest of those, and of `blocked_until`.
    /// - `blocked`: a block in force refuses outright, however long the caller would wait: a
    ///   reservation through a block would send every caller that lined up during it at the
    ///   moment it ends, the opposite of backing off.
    /// - `free_slot` picks a free or expired slot with `SKIP LOCKED`: callers never queue on
    ///   one counter row, and a slot cannot be handed out twice.
    /// - `took` and `held` write only when everything fits within `max_wait`.
    ///
    /// Unknown providers and unlimited dimensions cost nothing.
    pub async fn take(&self, provider: &str, ask: &Ask) -> Result<Permit, TakeError> {
        let holder = Uuid::new_v4();
        let amounts = [ask.input_tokens as f64, ask.max_output_tokens as f64, 1.0];
        let row = sqlx::query(
            "WITH asked (dimension, amount) AS (
                 SELECT a.dimension, a.amount
                   FROM unnest($2::text[], $3::float8[]) AS a (dimension, amount)
             ),
             bucket AS MATERIALIZED (
                 SELECT b.dimension, b.capacity, b.burst, a.amount,
                        least(b.burst,
                              b.tokens + b.capacity * extract(epoch FROM now() - b.refilled_at)::float8 / 60.0) AS level
                   FROM provider_budgets b
                   JOIN asked a ON a.dimension = b.dimension
                  WHERE b.provider = $1
                    AND b.capacity IS NOT NULL
                  ORDER BY b.dimension
                    FOR NO KEY UPDATE OF b
             ),
             ready AS (
                 SELECT c.dimension, c.capacity, c.amount,
                        now() + make_interval(secs => greatest(0, least(c.amount, c.burst) - c.level) * 60.0 / c.capacity) AS ready_at
                   FROM bucket c
             ),
             blocked AS (
                 SELECT max(b.blocked_until) AS until
                   FROM provider_budgets b
                  WHERE b.provider = $1
                    AND b.blocked_until > now()
             ),
             verdict AS (
                 SELECT w.reason, w.ready_at
                   FROM (SELECT r.dimension AS reason, r.ready_at FROM ready r
                         UNION ALL
                         SELECT 'blocked', k.until FROM blocked k
                         UNION ALL
                         SELECT NULL, now()) AS w
                  WHERE w.ready_at IS NOT NULL
                  ORDER BY w.ready_at DESC, w.reason NULLS LAST
                  LIMIT 1
             ),
             too_large AS (
                 SELECT r.dimension, r.amount, r.capacity
                   FROM ready r
                  WHERE r.amount > r.capacity
                  ORDER BY r.dimension
                  LIMIT 1
             ),
             free_slot AS MATERIALIZED (
                 SELECT s.slot
                   FROM provider_slots s
                  WHERE s.provider = $1
                    AND (s.holder IS NULL OR s.expires_at <= now())
                  ORDER BY s.slot
                  LIMIT 1
                    FOR NO KEY UPDATE SKIP LOCKED
             ),
             decision AS (
                 SELECT v.reason, v.ready_at,
                        NOT EXISTS (SELECT 1 FROM too_large)
                          AND (SELECT k.until FROM blocked k) IS NULL
                          AND v.ready_at <= now() + make_interval(secs => $4) AS in_budget,
                        EXISTS (SELECT 1 FROM free_slot)
                          OR NOT EXISTS (SELECT 1 FROM provider_slots s WHERE s.provider = $1) AS slot_free
                   FROM verdict v
             ),
             took AS (
                 UPDATE provider_budgets b
                    SET tokens = c.level - c.amount,
                        refilled_at = now()
                   FROM bucket c, decision d
                  WHERE d.in_budget
                    AND d.slot_free
                    AND b.provider = $1
                    AND b.dimension = c.dimension
                 RETURNING b.dimension
             ),
             held AS (
                 UPDATE provider_slots s
                    SET holder = $5,
                        expires_at = d.ready_at + make_interval(secs => $6)
                   FROM free_slot f, decision d
                  WHERE d.in_budget
                    AND d.slot_free
                    AND s.provider = $1
                    AND s.slot = f.slot
                 RETURNING s.slot
             )
             SELECT d.in_budget, d.slot_free, d.reason, d.ready_at,
                    (SELECT k.until FROM blocked k) IS NOT NULL AS blocked,
                    greatest(0, extract(epoch FROM d.ready_at - now())::float8) AS delay_secs,
                    now() + make_interval(secs => $7) AS slot_retry_at,
                    (SELECT h.slot FROM held h) AS slot,
                    (SELECT count(*) FROM took) AS took,
                    (SELECT t.dimension FROM too_large t) AS too_large_dimension,
                    (SELECT t.amount FROM too_large t) AS too_large_amount,
                    (SELECT t.capacity FROM too_large t) AS too_large_capacity
               FROM decision d",
        )
        .bind(provider)
        .bind(Dimension::ALL.map(Dimension::as_str).to_vec())
        .bind(amounts.to_vec())
        .bind(ask.max_wait.as_secs_f64())
        .bind(holder)
        .bind(ask.hold_for.as_secs_f64())
        .bind(IN_FLIGHT_RETRY.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;

        let in_budget: bool = row.try_get("in_budget")?;
        let slot_free: bool = row.try_get("slot_free")?;
        let reason: Option<String> = row.try_get("reason")?;
        let ready_at: DateTime<Utc> = row.try_get("ready_at")?;
        let delay = secs(row.try_get("delay_secs")?);
        if let Some(dimension) = row.try_get::<Option<String>, _>("too_large_dimension")? {
            let amount: f64 = row.try_get("too_large_amount")?;
            let capacity: i64 = row.try_get("too_large_capacity")?;
            return Err(TakeError::TooLarge {
                provider: provider.to_owned(),
                dimension: Dimension::parse(&dimension).unwrap_or(Dimension::Requests),
                requested: amount as u64,
                capacity: capacity.max(0) as u64,
            });
        }
        if !in_budget {
            let blocked: bool = row.try_get("blocked")?;
            let reason = match reason.as_deref().and_then(Dimension::parse) {
                Some(d) if !blocked => WaitReason::Budget(d),
                _ => WaitReason::Blocked,
            };
            return Err(TakeError::Wait {
                provider: provider.to_owned(),
                until: ready_at,
                after: delay,
                reason,
            });
        }
        if !slot_free {
            let until: DateTime<Utc> = row.try_get("slot_retry_at")?;
            return Err(TakeError::Wait {
                provider: provider.to_owned(),
                until,
                after: IN_FLIGHT_RETRY,
                reason: WaitReason::InFlight,
            });
        }
        let slot: Option<i32> = row.try_get("slot")?;
        Ok(Permit {
            provider: provider.to_owned(),
            input_tokens: ask.input_tokens,
            max_output_tokens: ask.max_output_tokens,
            delay,
            slot: slot.map(|s| (s, holder)),
        })
    }

    /// **Settle** (after a call): gives `back` (input, output, requests; negative = take more)
    /// to the buckets, capped at their burst, and frees the permit's slot if it still holds it.
    /// The slot is released with `SKIP LOCKED`: it can only be locked by someone else when it
    /// expired and is being taken over, and then it is not ours to free anyway.
    async fn settle_permit(&self, permit: &Permit, back: [f64; 3]) -> Result<()> {
        let (slot, holder) = match permit.slot {
            Some((s, h)) => (Some(s), Some(h)),
            None => (None, None),
        };
        sqlx::query(
            "WITH back (dimension, delta) AS (
                 SELECT k.dimension, k.delta
                   FROM unnest($2::text[], $3::float8[]) AS k (dimension, delta)
                  WHERE k.delta <> 0
             ),
             refund AS (
                 UPDATE provider_budgets b
                    SET tokens = least(b.burst,
                                       least(b.burst,
                                             b.tokens + b.capacity * extract(epoch FROM now() - b.refilled_at)::float8 / 60.0)
                                       + k.delta),
                        refilled_at = now()
                   FROM back k
                  WHERE b.provider = $1
                    AND b.dimension = k.dimension
                    AND b.capacity IS NOT NULL
                    AND (b.provider, b.dimension) IN (SELECT l.provider, l.dimension
                                                        FROM provider_budgets l
                                                        JOIN back lk ON lk.dimension = l.dimension
                                                       WHERE l.provider = $1
                                                         AND l.capacity IS NOT NULL
                                                       ORDER BY l.dimension
                                                         FOR NO KEY UPDATE OF l)
                 RETURNING b.dimension
             ),
             freed AS (
                 UPDATE provider_slots s
                    SET holder = NULL,
                        expires_at = NULL
                  WHERE s.provider = $1
                    AND s.slot = $4
                    AND s.holder = $5
                    AND s.slot IN (SELECT f.slot
                                     FROM provider_slots f
                                    WHERE f.provider = $1
                                      AND f.slot = $4
                                      AND f.holder = $5
                                      FOR NO KEY UPDATE SKIP LOCKED)
                 RETURNING s.slot
             )
             SELECT (SELECT count(*) FROM refund) AS refunded, (SELECT count(*) FROM freed) AS freed",
        )
        .bind(&permit.provider)
        .bind(Dimension::ALL.map(Dimension::as_str).to_vec())
        .bind(back.to_vec())
        .bind(slot)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// **Observe** (after every response, success or not): lowers each bucket to what the
    /// provider's rate-limit headers say remains, when that is less than the bucket holds;
    /// never raises one (the headers lag behind the fleet's own takes, and another consumer of
    /// the same key shows up only as a lower figure). Returns the dimensions lowered.
    ///
    /// `header` looks a header up by lower-case name, e.g.
    /// `|name| response.headers().get(name)?.to_str().ok()`.
    pub async fn observe_headers<'h>(
        &self,
        provider: &str,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> Result<Vec<Dimension>> {
        let remaining = remaining_from_headers(header);
        if remaining.is_empty() {
            return Ok(Vec::new());
        }
        let dimensions: Vec<&str> = remaining.iter().map(|(d, _)| d.as_str()).collect();
        let values: Vec<f64> = remaining.iter().map(|(_, v)| *v).collect();
        let lowered: Vec<String> = sqlx::query_scalar(
            "WITH seen (dimension, remaining) AS (
                 SELECT o.dimension, o.remaining
                   FROM unnest($2::text[], $3::float8[]) AS o (dimension, remaining)
             ),
             bucket AS MATERIALIZED (
                 SELECT b.dimension,
                        least(b.burst,
                              b.tokens + b.capacity * extract(epoch FROM now() - b.refilled_at)::float8 / 60.0) AS level
                   FROM provider_budgets b
                   JOIN seen o ON o.dimension = b.dimension
                  WHERE b.provider = $1
                    AND b.capacity IS NOT NULL
                  ORDER BY b.dimension
                    FOR NO KEY UPDATE OF b
             )
             UPDATE provider_budgets b
                SET tokens = o.remaining,
                    refilled_at = now()
               FROM bucket c
               JOIN seen o ON o.dimension = c.dimension
              WHERE b.provider = $1
                AND b.dimension = c.dimension
                AND o.remaining < c.level
             RETURNING b.dimension",
        )
        .bind(provider)
        .bind(dimensions)
        .bind(values)
        .fetch_all(&self.pool)
        .await?;
        Ok(lowered.iter().filter_map(|d| Dimension::parse(d)).collect())
    }

    /// **Block** (after a 429): nothing is taken from the provider before `until`, across the
    /// fleet. Only ever moves the block later. Creates unlimited rows for a provider nobody
    /// configured, so the block holds for it too.
    pub async fn block_until(&self, provider: &str, until: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO provider_budgets AS b (provider, dimension, blocked_until)
             SELECT $1, d.dimension, $3
               FROM unnest($2::text[]) AS d (dimension)
              ORDER BY d.dimension
             ON CONFLICT (provider, dimension) DO UPDATE
                SET blocked_until = greatest(b.blocked_until, EXCLUDED.blocked_until)",
        )
        .bind(provider)
        .bind(Dimension::ALL.map(Dimension::as_str).to_vec())
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// **Status** (for operators, e.g. `bizq providers`): every budget row as it stands now,
    /// read without locks (the level is refilled in the query, nothing is written).
    pub async fn status(&self) -> Result<Vec<BudgetStatus>> {
        let rows = sqlx::query(
            "SELECT b.provider, b.dimension, b.capacity,
                    least(b.burst,
                          b.tokens + b.capacity * extract(epoch FROM now() - b.refilled_at)::float8 / 60.0) AS level,
                    CASE WHEN b.blocked_until > now() THEN b.blocked_until END AS blocked_until,
                    (SELECT count(*) FILTER (WHERE s.holder IS NOT NULL AND s.expires_at > now())
                       FROM provider_slots s WHERE s.provider = b.provider) AS slots_held,
                    (SELECT count(*) FROM provider_slots s WHERE s.provider = b.provider) AS slots
               FROM provider_budgets b
              ORDER BY b.provider, b.dimension",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let dimension: String = r.try_get("dimension")?;
            let Some(dimension) = Dimension::parse(&dimension) else {
                continue;
            };
            let slots: i64 = r.try_get("slots")?;
            out.push(BudgetStatus {
                provider: r.try_get("provider")?,
                dimension,
                per_minute: r
                    .try_get::<Option<i64>, _>("capacity")?
                    .map(|c| c.max(0) as u64),
                level: r.try_get("level")?,
                blocked_until: r.try_get("blocked_until")?,
                max_in_flight: (slots > 0).then_some(slots.max(0) as u64),
                in_flight: r.try_get::<i64, _>("slots_held")?.max(0) as u64,
            });
        }
        Ok(out)
    }
}

/// One budget row as [`Budgets::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetStatus {
    pub provider: String,
    pub dimension: Dimension,
    /// `None` = unlimited.
    pub per_minute: Option<u64>,
    /// What the bucket holds now; negative while reservations are outstanding.
    pub level: Option<f64>,
    /// A 429's block still in force.
    pub blocked_until: Option<DateTime<Utc>>,
    /// The provider's fleet-wide cap, and slots held now (the same on each of its rows).
    pub max_in_flight: Option<u64>,
    pub in_flight: u64,
}

/// A bucket's burst for a per-minute capacity: [`BURST`] worth, at least 1, at most the
/// capacity.
fn burst_of(capacity: i64) -> f64 {
    let c = capacity as f64;
    (c * BURST.as_secs_f64() / 60.0).max(1.0).min(c)
}

fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s)
    } else {
        Duration::ZERO
    }
}

/// The remaining figures a response's rate-limit headers report, per dimension (the lowest
/// when several headers speak for one). OpenAI's `x-ratelimit-remaining-tokens` and
/// Anthropic's `anthropic-ratelimit-tokens-remaining` count input and output together, so
/// they cap both token buckets.
pub fn remaining_from_headers<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
) -> Vec<(Dimension, f64)> {
    const HEADERS: [(&str, &[Dimension]); 6] = [
        ("x-ratelimit-remaining-requests", &[Dimension::Requests]),
        (
            "x-ratelimit-remaining-tokens",
            &[Dimension::InputTokens, Dimension::OutputTokens],
        ),
        (
            "anthropic-ratelimit-requests-remaining",
            &[Dimension::Requests],
        ),
        (
            "anthropic-ratelimit-tokens-remaining",
            &[Dimension::InputTokens, Dimension::OutputTokens],
        ),
        (
            "anthropic-ratelimit-input-tokens-remaining",
            &[Dimension::InputTokens],
        ),
        (
            "anthropic-ratelimit-output-tokens-remaining",
            &[Dimension::OutputTokens],
        ),
    ];
    let mut out: Vec<(Dimension, f64)> = Vec::new();
    for (name, dimensions) in HEADERS {
        let Some(value) = header(name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        for &d in dimensions {
            match out.iter_mut().find(|(seen, _)| *seen == d) {
                Some((_, v)) => *v = v.min(value),
                None => out.push((d, value)),
            }
        }
    }
    out.sort_by_key(|(d, _)| *d);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    /// OpenAI's combined token figure caps both token buckets; the lower of two figures wins.
    #[test]
    fn headers_map_to_dimensions() {
        let h = [
            ("x-ratelimit-remaining-requests", "7"),
            ("x-ratelimit-remaining-tokens", "1200"),
            ("anthropic-ratelimit-output-tokens-remaining", "300"),
            ("anthropic-ratelimit-input-tokens-remaining", "not a number"),
        ];
        let got = remaining_from_headers(lookup(&h));
        assert_eq!(
            got,
            vec![
                (Dimension::Requests, 7.0),
                (Dimension::InputTokens, 1200.0),
                (Dimension::OutputTokens, 300.0),
            ]
        );
        assert!(remaining_from_headers(lookup(&[])).is_empty());
    }

    #[test]
    fn burst_is_a_quarter_second_at_least_one() {
        assert_eq!(burst_of(6000), 25.0);
        assert_eq!(burst_of(120), 1.0);
        assert_eq!(burst_of(1), 1.0);
    }
}
