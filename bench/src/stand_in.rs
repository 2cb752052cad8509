//! The providers benchmark's stand-in AI provider: an HTTP server on 127.0.0.1 answering
//! OpenAI Chat Completions (with usage) after a fixed latency, counting what it receives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// Completion tokens in every answer (the bench's tasks ask `max_tokens` of at least this).
pub const COMPLETION_TOKENS: u64 = 16;

/// What the stand-in saw: every call's arrival, and the calls it held at once.
#[derive(Debug)]
struct Counts {
    latency: Duration,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    answered: AtomicU64,
    arrivals: Mutex<Vec<Instant>>,
}

/// Decrements the in-flight count when a call ends, answered or dropped by its client.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    addr: SocketAddr,
    counts: Arc<Counts>,
    server: tokio::task::JoinHandle<()>,
}

/// The stand-in's counts at one moment.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Arrival of every call, in order.
    pub arrivals: Vec<Instant>,
    /// Calls answered (a body was handed to the connection).
    pub answered: u64,
    /// The most calls it held at once.
    pub peak_in_flight: usize,
}

impl Seen {
    /// Calls held on average from the first arrival to the last answer (every call is held
    /// exactly `latency`): how full the callers kept their slots.
    pub fn mean_in_flight(&self, latency: Duration) -> f64 {
        match (self.arrivals.first(), self.arrivals.last()) {
            (Some(first), Some(last)) => {
                let span = (*last - *first + latency).as_secs_f64();
                self.arrivals.len() as f64 * latency.as_secs_f64() / span
            }
            _ => 0.0,
        }
    }
}

impl StandIn {
    /// Listens on a free port of 127.0.0.1; every call is answered `latency` after it arrives.
    pub async fn start(latency: Duration) -> anyhow::Result<Self> {
        let counts = Arc::new(Counts {
            latency,
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            arrivals: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the stand-in provider to 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(counts.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bizq-bench: the stand-in provider stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            counts,
            server,
        })
    }

    /// The `base_url` of a `kind = "openai"` provider pointing here.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// When the first call arrived, if one has.
    pub fn first_arrival(&self) -> Option<Instant> {
        self.counts
            .arrivals
            .lock()
            .ok()
            .and_then(|a| a.first().copied())
    }

    pub fn seen(&self) -> Seen {
        let mut arrivals = self
            .counts
            .arrivals
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        arrivals.sort();
        Seen {
            arrivals,
            answered: self.counts.answered.load(Ordering::SeqCst),
            peak_in_flight: self.counts.peak_in_flight.load(Ordering::SeqCst),
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `POST /v1/chat/completions`: waits the latency, then answers as OpenAI documents it, with
/// usage (prompt tokens estimated at 4 characters each, [`COMPLETION_TOKENS`] out).
async fn chat_completions(State(counts): State<Arc<Counts>>, body: Bytes) -> Response {
    let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _in_flight = InFlight(&counts.in_flight);
    counts.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    if let Ok(mut a) = counts.arrivals.lock() {
        a.push(Instant::now());
    }
    tokio::time::sleep(counts.latency).await;
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let prompt = request["messages"][0]["content"].as_str().unwrap_or("");
    let prompt_tokens = (prompt.chars().count() as u64).div_ceil(4).max(1);
    let n = counts.answered.fetch_add(1, Ordering::SeqCst) + 1;
    let answer = json!({
        "id": format!("chatcmpl-bench-{n}"),
        "object": "chat.completion",
        "created": 1_764_000_000,
        "model": request["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": format!("stand-in answer {n}"), "refusal": null},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": prompt_tokens + COMPLETION_TOKENS,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    });
    let mut response = answer.to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
