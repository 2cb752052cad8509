//! Fleet-wide provider rate budgets (`bizq::providers::limiter`, migration 0010) against a real
//! PostgreSQL: refill arithmetic, all-or-nothing takes, refunds, rate-limit headers, 429
//! blocks, and the budget and `max_in_flight` caps under concurrent workers.
//!
//! Time is controlled through the database, never by sleeping for minutes: a test moves a
//! bucket's `refilled_at` (or a slot's `expires_at`) into the past, and checks levels against
//! the `refilled_at` the statements themselves recorded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bizq::providers::limiter::{Ask, Budgets, Dimension, Limits, TakeError, WaitReason};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A bucket row as stored.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: DateTime<Utc>,
    capacity: f64,
    burst: f64,
}

impl Bucket {
    /// The spec's lazy refill: `least(burst, tokens + capacity × elapsed / 60 s)` at `t`.
    fn level_at(&self, t: DateTime<Utc>) -> f64 {
        let elapsed = (t - self.refilled_at).num_microseconds().expect("fits") as f64 / 1e6;
        self.burst.min(self.tokens + self.capacity * elapsed / 60.0)
    }
}

async fn bucket(pool: &PgPool, provider: &str, dimension: &str) -> anyhow::Result<Bucket> {
    let (tokens, refilled_at, capacity, burst): (f64, DateTime<Utc>, i64, f64) = sqlx::query_as(
        "SELECT tokens, refilled_at, capacity, burst
           FROM provider_budgets
          WHERE provider = $1 AND dimension = $2",
    )
    .bind(provider)
    .bind(dimension)
    .fetch_one(pool)
    .await?;
    Ok(Bucket {
        tokens,
        refilled_at,
        capacity: capacity as f64,
        burst,
    })
}

/// Puts a bucket at `tokens` as of `ago` before now.
async fn set_bucket(
    pool: &PgPool,
    provider: &str,
    dimension: &str,
    tokens: f64,
    ago: Duration,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE provider_budgets
            SET tokens = $3, refilled_at = now() - make_interval(secs => $4)
          WHERE provider = $1 AND dimension = $2",
    )
    .bind(provider)
    .bind(dimension)
    .bind(tokens)
    .bind(ago.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

fn ask(input_tokens: u64, max_output_tokens: u64, max_wait: Duration) -> Ask {
    Ask {
        input_tokens,
        max_output_tokens,
        max_wait,
        hold_for: Duration::from_secs(60),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

/// Refill is lazy and exact: a bucket refills at capacity/60 per second of the time since its
/// `refilled_at`, up to its burst, and a refusal names the moment the bucket will hold enough.
/// Pins the refill term and the burst cap of the take's `bucket` step, and the `ready` time.
#[sqlx::test(migrations = "../migrations")]
async fn refill_is_lazy_proportional_to_elapsed_time_and_capped_at_the_burst(
    pool: PgPool,
) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    let limits = Limits {
        rpm: Some(60),
        ..Limits::default()
    };
    budgets.configure("p", &limits).await?;
    let fresh = bucket(&pool, "p", "requests").await?;
    assert_eq!(
        (fresh.capacity, fresh.burst, fresh.tokens),
        (60.0, 1.0, 1.0)
    );

    // 30 requests in debt 10 s ago, refilling at 1/s: 20 in debt now, so the next request is
    // ready in 21 s (its 1 request on top of the debt).
    set_bucket(&pool, "p", "requests", -30.0, Duration::from_secs(10)).await?;
    let before = bucket(&pool, "p", "requests").await?;
    match budgets.take("p", &ask(0, 0, Duration::ZERO)).await {
        Err(TakeError::Wait {
            after,
            reason,
            until,
            ..
        }) => {
            assert_eq!(reason, WaitReason::Budget(Dimension::Requests));
            // Ready when -30 + elapsed reaches 1: 31 s after refilled_at, however long the
            // statements took.
            let expected = before.refilled_at + chrono::Duration::seconds(31);
            assert!(
                (until - expected).num_milliseconds().abs() < 1,
                "ready at {until}, expected {expected}"
            );
            assert!(after <= Duration::from_secs(21), "{after:?}");
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    // A refusal writes nothing.
    let unchanged = bucket(&pool, "p", "requests").await?;
    assert_eq!(unchanged.refilled_at, before.refilled_at);
    assert!(close(unchanged.tokens, -30.0));

    // Partly refilled: 2.5 s ago at -2, so -0.5 now; a 2 s wait is enough for the reservation.
    set_bucket(&pool, "p", "requests", -2.0, Duration::from_millis(2500)).await?;
    let before = bucket(&pool, "p", "requests").await?;
    let permit = budgets
        .take("p", &ask(0, 0, Duration::from_secs(2)))
        .await?;
    let after = bucket(&pool, "p", "requests").await?;
    let expected = before.level_at(after.refilled_at) - 1.0;
    assert!(
        close(after.tokens, expected),
        "level {} after the take, expected {expected}",
        after.tokens
    );
    assert!(
        permit.delay > Duration::ZERO && permit.delay <= Duration::from_millis(1500),
        "a reservation up to 1.5 s ahead, got {:?}",
        permit.delay
    );
    permit.settle_unknown(&budgets).await?;

    // An hour of refill fills the bucket to its burst, not to 60 requests.
    set_bucket(&pool, "p", "requests", -30.0, Duration::from_secs(3600)).await?;
    let permit = budgets.take("p", &ask(0, 0, Duration::ZERO)).await?;
    assert_eq!(permit.delay, Duration::ZERO);
    permit.settle_unknown(&budgets).await?;
    let after = bucket(&pool, "p", "requests").await?;
    assert!(
        close(after.tokens, 0.0),
        "burst 1 minus 1 taken, got {}",
        after.tokens
    );
    assert!(matches!(
        budgets.take("p", &ask(0, 0, Duration::ZERO)).await,
        Err(TakeError::Wait { .. })
    ));
    Ok(())
}

/// A take spends every dimension or none: when one bucket is short, the others are left as
/// they were, and the refusal names the dimension that is ready last. Pins the `in_budget`
/// condition of the take's `took` step.
#[sqlx::test(migrations = "../migrations")]
async fn a_take_is_all_or_nothing_and_names_the_last_dimension_to_be_ready(
    pool: PgPool,
) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(600),
                input_tpm: Some(60_000),
                output_tpm: Some(6_000),
                max_in_flight: None,
            },
        )
        .await?;
    // Input 1,000 in debt (1,000/s: 100 more ready in 1.1 s), output 500 in debt (100/s: 20
    // more ready in 5.2 s).
    set_bucket(&pool, "p", "input_tokens", -1_000.0, Duration::ZERO).await?;
    set_bucket(&pool, "p", "output_tokens", -500.0, Duration::ZERO).await?;
    let before: Vec<Bucket> = vec![
        bucket(&pool, "p", "input_tokens").await?,
        bucket(&pool, "p", "output_tokens").await?,
        bucket(&pool, "p", "requests").await?,
    ];

    match budgets.take("p", &ask(100, 20, Duration::ZERO)).await {
        Err(TakeError::Wait { reason, after, .. }) => {
            assert_eq!(reason, WaitReason::Budget(Dimension::OutputTokens));
            assert!(after <= Duration::from_millis(5200), "{after:?}");
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    for (d, b) in ["input_tokens", "output_tokens", "requests"]
        .iter()
        .zip(&before)
    {
        let now = bucket(&pool, "p", d).await?;
        assert!(
            close(now.tokens, b.tokens) && now.refilled_at == b.refilled_at,
            "{d} changed by a refused take: {b:?} -> {now:?}"
        );
    }

    // Willing to wait 10 s, all three are taken at once, as a reservation.
    let permit = budgets
        .take("p", &ask(100, 20, Duration::from_secs(10)))
        .await?;
    assert!(permit.delay <= Duration::from_millis(5200) && permit.delay > Duration::ZERO);
    for (d, (b, amount)) in ["input_tokens", "output_tokens", "requests"]
        .iter()
        .zip(before.iter().zip([100.0, 20.0, 1.0]))
    {
        let now = bucket(&pool, "p", d).await?;
        let expected = b.level_at(now.refilled_at) - amount;
        assert!(
            close(now.tokens, expected),
            "{d}: {} after the take, expected {expected}",
            now.tokens
        );
    }
    permit.settle_unknown(&budgets).await?;
    Ok(())
}

/// A call asking more than a whole minute's budget is refused for good (it would otherwise
/// wait forever) and takes nothing; one asking exactly a minute's worth goes when the bucket
/// is full and leaves it in debt; unlimited dimensions and unknown providers cost nothing.
/// Pins the `too_large` step.
#[sqlx::test(migrations = "../migrations")]
async fn a_call_larger_than_a_minute_is_refused_permanently(pool: PgPool) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                output_tpm: Some(6_000),
                ..Limits::default()
            },
        )
        .await?;
    let full = bucket(&pool, "p", "output_tokens").await?;
    match budgets
        .take("p", &ask(0, 6_001, Duration::from_secs(600)))
        .await
    {
        Err(TakeError::TooLarge {
            dimension,
            requested,
            capacity,
            ..
        }) => assert_eq!(
            (dimension, requested, capacity),
            (Dimension::OutputTokens, 6_001, 6_000)
        ),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let after = bucket(&pool, "p", "output_tokens").await?;
    assert_eq!(after.refilled_at, full.refilled_at, "nothing taken");

    // Input is unlimited: a million input tokens cost nothing.
    let permit = budgets
        .take("p", &ask(1_000_000, 6_000, Duration::ZERO))
        .await?;
    let after = bucket(&pool, "p", "output_tokens").await?;
    assert!(close(after.tokens, full.burst - 6_000.0), "{after:?}");
    permit.settle_unknown(&budgets).await?;

    let permit = budgets
        .take(
            "nobody-configured-this",
            &ask(u64::from(u32::MAX), 1 << 40, Duration::ZERO),
        )
        .await?;
    assert_eq!((permit.delay, permit.slot()), (Duration::ZERO, None));
    permit.settle_unknown(&budgets).await?;
    Ok(())
}

/// Settling gives back the output not generated (taken at `max_tokens`) and corrects the
/// input estimate in both directions; giving a permit back returns everything. Pins the
/// `refund` step of settle.
#[sqlx::test(migrations = "../migrations")]
async fn settle_refunds_unused_output_and_corrects_the_input_estimate(
    pool: PgPool,
) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(6_000),
                input_tpm: Some(60_000),
                output_tpm: Some(60_000),
                max_in_flight: None,
            },
        )
        .await?;
    // Full buckets of 250: asks of thousands leave them deep in debt, far from the cap.
    let permit = budgets
        .take("p", &ask(2_000, 4_000, Duration::ZERO))
        .await?;
    let input = bucket(&pool, "p", "input_tokens").await?;
    let output = bucket(&pool, "p", "output_tokens").await?;
    assert!(close(input.tokens, 250.0 - 2_000.0) && close(output.tokens, 250.0 - 4_000.0));

    // The prompt was 500 tokens longer than estimated; 1,000 of 4,000 tokens were generated.
    permit.settle(&budgets, 2_500, 1_000).await?;
    let input_now = bucket(&pool, "p", "input_tokens").await?;
    let output_now = bucket(&pool, "p", "output_tokens").await?;
    let expected_input = input.level_at(input_now.refilled_at) - 500.0;
    let expected_output = output.level_at(output_now.refilled_at) + 3_000.0;
    assert!(
        close(input_now.tokens, expected_input),
        "input {} expected {expected_input}",
        input_now.tokens
    );
    assert!(
        close(output_now.tokens, expected_output),
        "output {} expected {expected_output}",
        output_now.tokens
    );

    // A call never made gives back the request and every token it took.
    set_bucket(&pool, "p", "output_tokens", -5_000.0, Duration::ZERO).await?;
    let permit = budgets
        .take("p", &ask(0, 100, Duration::from_secs(60)))
        .await?;
    let taken = bucket(&pool, "p", "output_tokens").await?;
    permit.give_back(&budgets).await?;
    let back = bucket(&pool, "p", "output_tokens").await?;
    let expected = taken.level_at(back.refilled_at) + 100.0;
    assert!(
        close(back.tokens, expected),
        "{} expected {expected}",
        back.tokens
    );
    Ok(())
}

/// The provider's rate-limit headers lower a bucket to what they say remains, never raise it,
/// and OpenAI's combined token figure caps both token buckets. Pins the `remaining < level`
/// condition of observe.
#[sqlx::test(migrations = "../migrations")]
async fn headers_lower_a_bucket_but_never_raise_it(pool: PgPool) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(6_000),
                input_tpm: Some(600_000),
                output_tpm: Some(60_000),
                max_in_flight: None,
            },
        )
        .await?;
    let headers = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    };

    // The requests bucket holds a whole minute here (600, refilling at 10/s), so that neither
    // its cap nor its refill hides a raise during the test.
    sqlx::query(
        "UPDATE provider_budgets SET burst = 600, tokens = 600, refilled_at = now()
          WHERE provider = 'p' AND dimension = 'requests'",
    )
    .execute(&pool)
    .await?;

    // OpenAI: 3 requests left.
    let lowered = budgets
        .observe_headers("p", headers(&[("x-ratelimit-remaining-requests", "3")]))
        .await?;
    assert_eq!(lowered, vec![Dimension::Requests]);
    let requests = bucket(&pool, "p", "requests").await?;
    assert!(close(requests.tokens, 3.0), "{requests:?}");

    // A higher figure later does not raise it.
    let lowered = budgets
        .observe_headers("p", headers(&[("x-ratelimit-remaining-requests", "50")]))
        .await?;
    assert!(lowered.is_empty(), "{lowered:?}");
    let again = bucket(&pool, "p", "requests").await?;
    assert_eq!(
        (again.tokens, again.refilled_at),
        (requests.tokens, requests.refilled_at),
        "raised by a higher remaining figure"
    );

    // 100,000 tokens left is more than the token buckets hold (2,500 and 250): no change.
    let lowered = budgets
        .observe_headers("p", headers(&[("x-ratelimit-remaining-tokens", "100000")]))
        .await?;
    assert!(lowered.is_empty(), "{lowered:?}");
    assert!(close(
        bucket(&pool, "p", "input_tokens").await?.tokens,
        2_500.0
    ));

    // OpenAI's combined figure below both token buckets lowers both; Anthropic's output
    // figure lowers output further.
    let lowered = budgets
        .observe_headers(
            "p",
            headers(&[
                ("x-ratelimit-remaining-tokens", "200"),
                ("anthropic-ratelimit-output-tokens-remaining", "40"),
            ]),
        )
        .await?;
    assert_eq!(
        lowered.len(),
        2,
        "input and output lowered, got {lowered:?}"
    );
    assert!(close(
        bucket(&pool, "p", "input_tokens").await?.tokens,
        200.0
    ));
    assert!(close(
        bucket(&pool, "p", "output_tokens").await?.tokens,
        40.0
    ));
    Ok(())
}

/// After a 429, nothing is taken before `blocked_until`, from any worker; a block only moves
/// later; a provider nobody configured can be blocked too; an expired block is ignored.
/// Pins the take's `blocked` step.
#[sqlx::test(migrations = "../migrations")]
async fn a_block_refuses_every_take_until_its_time(pool: PgPool) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(6_000),
                ..Limits::default()
            },
        )
        .await?;
    let until = Utc::now() + chrono::Duration::seconds(30);
    budgets.block_until("p", until).await?;
    budgets
        .block_until("p", Utc::now() + chrono::Duration::seconds(5))
        .await?;
    let before = bucket(&pool, "p", "requests").await?;
    // Refused even by a caller willing to wait longer than the block: no reservations
    // through a block, so callers do not all fire the moment it ends.
    match budgets.take("p", &ask(0, 0, Duration::from_secs(60))).await {
        Err(TakeError::Wait {
            reason, until: at, ..
        }) => {
            assert_eq!(reason, WaitReason::Blocked);
            assert!(
                (at - until).num_milliseconds().abs() < 1,
                "blocked until {at}, expected the later block {until}"
            );
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    assert_eq!(
        bucket(&pool, "p", "requests").await?.refilled_at,
        before.refilled_at
    );

    let status = budgets.status().await?;
    let requests = status
        .iter()
        .find(|row| row.provider == "p" && row.dimension == Dimension::Requests)
        .expect("a requests row");
    assert_eq!(requests.per_minute, Some(6_000));
    assert!(
        requests
            .blocked_until
            .is_some_and(|b| (b - until).num_milliseconds().abs() < 1)
    );

    // A provider without budgets is blocked as well.
    budgets.block_until("unconfigured", until).await?;
    assert!(matches!(
        budgets
            .take("unconfigured", &ask(0, 0, Duration::ZERO))
            .await,
        Err(TakeError::Wait {
            reason: WaitReason::Blocked,
            ..
        })
    ));

    // Once the time has passed, takes go again.
    sqlx::query("UPDATE provider_budgets SET blocked_until = now() - interval '1 second'")
        .execute(&pool)
        .await?;
    let permit = budgets.take("p", &ask(0, 0, Duration::ZERO)).await?;
    permit.settle_unknown(&budgets).await?;
    let status = budgets.status().await?;
    assert_eq!(status.len(), 6, "three rows each for p and unconfigured");
    assert!(
        status.iter().all(|row| row.blocked_until.is_none()),
        "status shows no block once it has passed"
    );
    let permit = budgets
        .take("unconfigured", &ask(0, 0, Duration::ZERO))
        .await?;
    permit.settle_unknown(&budgets).await?;
    Ok(())
}

/// A second pool on the same database: another worker.
async fn second_worker(pool: &PgPool) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pool.connect_options().as_ref().clone())
        .await?)
}

/// Many concurrent takes from two workers (two pools) never spend more than the bucket held
/// plus what it refilled, and every grant is accounted for: the final level equals the
/// starting level plus the refill minus exactly the number of grants. Pins the row lock of
/// the take's `bucket` step (without it, concurrent takes read the same level and spend the
/// same tokens) and the `in_budget` condition.
#[sqlx::test(migrations = "../migrations")]
async fn concurrent_takes_from_two_workers_never_exceed_the_budget(
    pool: PgPool,
) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(600),
                ..Limits::default()
            },
        )
        .await?;
    // A burst as large as the capacity, so that the bucket (50 now, 10/s) never reaches its
    // cap during the test and its level is exactly linear in time.
    sqlx::query(
        "UPDATE provider_budgets SET burst = 600, tokens = 50, refilled_at = now()
          WHERE provider = 'p' AND dimension = 'requests'",
    )
    .execute(&pool)
    .await?;
    let start = bucket(&pool, "p", "requests").await?;
    let other = second_worker(&pool).await?;

    let granted = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let budgets = Budgets::new(if i % 2 == 0 {
            pool.clone()
        } else {
            other.clone()
        });
        let granted = granted.clone();
        tasks.spawn(async move {
            for _ in 0..2 {
                match budgets.take("p", &ask(0, 0, Duration::ZERO)).await {
                    Ok(permit) => {
                        granted.fetch_add(1, Ordering::SeqCst);
                        permit.settle_unknown(&budgets).await?;
                    }
                    Err(TakeError::Wait { .. }) => {}
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let end = bucket(&pool, "p", "requests").await?;
    let granted = granted.load(Ordering::SeqCst) as f64;
    let refill = 10.0
        * (end.refilled_at - start.refilled_at)
            .num_microseconds()
            .expect("fits") as f64
        / 1e6;
    assert!(granted >= 50.0, "only {granted} of 400 takes were granted");
    assert!(
        end.tokens >= -1e-9,
        "the bucket went below zero: {} after {granted} grants",
        end.tokens
    );
    assert!(
        close(end.tokens, start.tokens + refill - granted),
        "{granted} grants from 50 + {refill} refilled should leave {}, the bucket holds {}",
        start.tokens + refill - granted,
        end.tokens
    );
    other.close().await;
    Ok(())
}

/// `max_in_flight` caps calls in flight across workers: 40 callers on two pools, 5 slots,
/// never more than 5 permits held at once, and every call eventually made. Pins the
/// free-or-expired condition of the take's `free_slot` step.
#[sqlx::test(migrations = "../migrations")]
async fn max_in_flight_is_never_exceeded_across_two_workers(pool: PgPool) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                max_in_flight: Some(5),
                ..Limits::default()
            },
        )
        .await?;
    let other = second_worker(&pool).await?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let budgets = Budgets::new(if i % 2 == 0 {
            pool.clone()
        } else {
            other.clone()
        });
        let (in_flight, peak, calls) = (in_flight.clone(), peak.clone(), calls.clone());
        tasks.spawn(async move {
            let mut made = 0;
            while made < 3 {
                match budgets.take("p", &ask(0, 0, Duration::ZERO)).await {
                    Ok(permit) => {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        permit.settle(&budgets, 0, 0).await?;
                        calls.fetch_add(1, Ordering::SeqCst);
                        made += 1;
                    }
                    Err(TakeError::Wait {
                        reason: WaitReason::InFlight,
                        after,
                        ..
                    }) => {
                        // Shorter than the hint, so the slots are contended hard.
                        tokio::time::sleep(after / 20).await;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 5, "{peak} calls in flight with max_in_flight = 5");
    assert!(peak >= 2, "the callers never overlapped (peak {peak})");
    assert_eq!(calls.load(Ordering::SeqCst), 120);
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provider_slots WHERE provider = 'p' AND holder IS NOT NULL",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(held, 0, "every settled permit freed its slot");
    other.close().await;
    Ok(())
}

/// The slots of a worker that crashed mid-call come back once they expire, and the crashed
/// holder's late release cannot free a slot someone else holds now. Pins the expiry term of
/// `free_slot` and the holder fence of settle's `freed` step.
#[sqlx::test(migrations = "../migrations")]
async fn slots_of_a_crashed_worker_come_back_after_expiry(pool: PgPool) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                max_in_flight: Some(2),
                ..Limits::default()
            },
        )
        .await?;
    // The "crashed" worker holds both slots and never settles.
    let crashed = [
        budgets.take("p", &ask(0, 0, Duration::ZERO)).await?,
        budgets.take("p", &ask(0, 0, Duration::ZERO)).await?,
    ];
    assert!(matches!(
        budgets.take("p", &ask(0, 0, Duration::ZERO)).await,
        Err(TakeError::Wait {
            reason: WaitReason::InFlight,
            ..
        })
    ));

    // Their hold time passes.
    sqlx::query(
        "UPDATE provider_slots SET expires_at = now() - interval '1 second' WHERE provider = 'p'",
    )
    .execute(&pool)
    .await?;
    let live = budgets.take("p", &ask(0, 0, Duration::ZERO)).await?;
    let slot = live.slot().expect("a capped provider hands out a slot");
    let status = budgets.status().await?;
    assert_eq!(status.iter().filter(|row| row.provider == "p").count(), 3);
    assert!(
        status
            .iter()
            .filter(|row| row.provider == "p")
            .all(|row| row.max_in_flight == Some(2) && row.in_flight == 1),
        "expired slots are not counted as in flight: {status:?}"
    );

    // The crashed worker comes back late and releases what it thought it held.
    for permit in crashed {
        permit.settle_unknown(&budgets).await?;
    }
    let holder_now: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT holder FROM provider_slots WHERE provider = 'p' AND slot = $1")
            .bind(slot)
            .fetch_one(&pool)
            .await?;
    assert!(
        holder_now.is_some(),
        "a stale release freed a live call's slot"
    );
    live.settle_unknown(&budgets).await?;
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provider_slots WHERE provider = 'p' AND holder IS NOT NULL",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(held, 0);
    Ok(())
}

/// Workers starting up configure the same provider at once; that neither refills nor resets
/// a bucket another worker has been spending. Pins the level-keeping upsert of configure.
#[sqlx::test(migrations = "../migrations")]
async fn configuring_again_keeps_the_current_level(pool: PgPool) -> anyhow::Result<()> {
    let budgets = Budgets::new(pool.clone());
    let limits = Limits {
        rpm: Some(60),
        max_in_flight: Some(3),
        ..Limits::default()
    };
    budgets.configure("p", &limits).await?;
    let permit = budgets.take("p", &ask(0, 0, Duration::ZERO)).await?;
    // Deep in debt, so no refill during the test brings it near full.
    set_bucket(&pool, "p", "requests", -30.0, Duration::ZERO).await?;
    let spent = bucket(&pool, "p", "requests").await?;

    let other_pool = second_worker(&pool).await?;
    let other = Budgets::new(other_pool.clone());
    let (a, b) = tokio::join!(
        budgets.configure("p", &limits),
        other.configure("p", &limits)
    );
    a?;
    b?;
    let after = bucket(&pool, "p", "requests").await?;
    assert_eq!(
        (after.tokens, after.refilled_at),
        (spent.tokens, spent.refilled_at)
    );
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provider_slots WHERE provider = 'p' AND holder IS NOT NULL",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(held, 1, "the held slot survives a re-configure");

    // A new capacity keeps the level too (refilled up to now, capped at the new burst).
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(120),
                ..limits
            },
        )
        .await?;
    let resized = bucket(&pool, "p", "requests").await?;
    assert_eq!(resized.capacity, 120.0);
    assert!(
        close(resized.tokens, spent.level_at(resized.refilled_at)),
        "{resized:?} from {spent:?}"
    );
    assert!(resized.tokens < -20.0, "reset to full: {resized:?}");
    permit.settle_unknown(&budgets).await?;
    other_pool.close().await;
    Ok(())
}

/// Reservations pace a fleet at the budget's rate: two workers (two pools), 40 callers each,
/// `rpm = 1200`, calls of 100 ms. Every caller takes with a 2 s `max_wait`, sleeps its
/// permit's delay and "calls". Over 12 s the calls stay within any 10-second window's share
/// (plus the burst and a call or two of timer jitter) and the fleet gets close to the whole
/// budget. This is the limiter's half of the rate-budget benchmark; it prints its figures.
/// Pins the small burst (with a whole minute's burst the first window holds 1,400 calls) and
/// the reservation (`max_wait`): without it the callers still reach the rate, but by racing
/// for every token, at about 13 refused takes (statements) per call instead of fewer than one.
#[sqlx::test(migrations = "../migrations")]
async fn reservations_pace_two_workers_at_the_budget_rate(pool: PgPool) -> anyhow::Result<()> {
    const RPM: u64 = 1_200;
    let run = Duration::from_secs(12);
    let budgets = Budgets::new(pool.clone());
    budgets
        .configure(
            "p",
            &Limits {
                rpm: Some(RPM),
                ..Limits::default()
            },
        )
        .await?;
    let other = second_worker(&pool).await?;
    let start = tokio::time::Instant::now();
    let calls = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let refusals = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..80 {
        let budgets = Budgets::new(if i % 2 == 0 {
            pool.clone()
        } else {
            other.clone()
        });
        let calls = calls.clone();
        let refusals = refusals.clone();
        tasks.spawn(async move {
            while start.elapsed() < run {
                match budgets.take("p", &ask(0, 0, Duration::from_secs(2))).await {
                    Ok(permit) => {
                        tokio::time::sleep(permit.delay).await;
                        calls.lock().expect("not poisoned").push(start.elapsed());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        permit.settle(&budgets, 0, 0).await?;
                    }
                    // A snoozed task would come back at `until`; here the caller sleeps.
                    Err(TakeError::Wait { after, .. }) => {
                        refusals.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(after).await;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let mut calls = calls.lock().expect("not poisoned").clone();
    calls.sort();
    let span = calls.last().copied().unwrap_or_default();
    let share = RPM as f64 / 6.0; // per 10 s
    let worst = calls
        .iter()
        .enumerate()
        .map(|(i, t)| {
            calls[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(10))
                .count()
        })
        .max()
        .unwrap_or(0);
    let rate = calls.len() as f64 / span.as_secs_f64() * 60.0;
    let refusals = refusals.load(Ordering::SeqCst);
    println!(
        "{} calls in {span:?}: {rate:.0}/min of {RPM} ({:.1}%); worst 10 s window {worst} of a {share:.0} share ({:.1}%); {refusals} refused takes",
        calls.len(),
        rate / RPM as f64 * 100.0,
        worst as f64 / share * 100.0
    );
    // The burst (5 calls) plus up to 5 calls of timer jitter.
    assert!(
        (worst as f64) <= share + 10.0,
        "worst 10 s window {worst} calls, share {share}"
    );
    assert!(
        refusals <= 2 * calls.len(),
        "{refusals} refused takes for {} calls: callers are polling",
        calls.len()
    );
    assert!(
        rate >= 0.9 * RPM as f64,
        "the fleet got only {rate:.0} of {RPM} requests per minute"
    );
    other.close().await;
    Ok(())
}
