//! What a call cost: token usage × the model's prices, in integer micro-dollars, and the
//! credits charged for it (`ceil(usd × credits_per_usd)`, at least 1).

use serde_json::{Value, json};

use crate::config::ProviderKind;

/// A model's prices in micro-dollars per million tokens (USD 0.40 / Mtok = 400_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl Prices {
    /// From the config's USD-per-million-tokens figures, rounded to the micro-dollar.
    pub fn from_usd_per_mtok(input: f64, cached_input: f64, output: f64) -> Self {
        let micros = |usd: f64| (usd * 1_000_000.0).round().max(0.0) as u64;
        Self {
            input: micros(input),
            cached_input: micros(cached_input),
            output: micros(output),
        }
    }
}

/// Token counts as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// OpenAI: `prompt_tokens` (cached ones included). Anthropic: `input_tokens` (cache excluded).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// OpenAI: `prompt_tokens_details.cached_tokens` (inside `input_tokens`).
    /// Anthropic: `cache_read_input_tokens` (on top of `input_tokens`).
    pub cached_input_tokens: u64,
    /// Anthropic: `cache_creation_input_tokens` (on top of `input_tokens`). OpenAI: 0.
    pub cache_write_tokens: u64,
}

/// The priced result of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// Rounded up to the micro-dollar.
    pub usd_micros: u64,
    pub credits: i32,
}

/// Prices `usage` for a provider of `kind`. All arithmetic is on integers: the sum is kept in
/// hundredths of a micro-dollar-token-per-million (so that 1.25× and 0.1× stay exact) and
/// rounded up once, at the end.
pub fn cost(kind: ProviderKind, usage: &Usage, prices: &Prices, credits_per_usd: u64) -> Cost {
    let u = |n: u64| u128::from(n);
    // Units: tokens × micro-USD-per-Mtok × 100.
    let scaled: u128 = match kind {
        ProviderKind::Anthropic => {
            u(usage.input_tokens) * u(prices.input) * 100
                + u(usage.cache_write_tokens) * u(prices.input) * 125
                + u(usage.cached_input_tokens) * u(prices.input) * 10
                + u(usage.output_tokens) * u(prices.output) * 100
        }
        ProviderKind::OpenAi | ProviderKind::Mock => {
            let cached = usage.cached_input_tokens.min(usage.input_tokens);
            u(usage.input_tokens - cached) * u(prices.input) * 100
                + u(cached) * u(prices.cached_input) * 100
                + u(usage.output_tokens) * u(prices.output) * 100
        }
    };
    // micro-USD = scaled / (100 × 1e6); credits = USD × credits_per_usd = scaled × cpu / (100 × 1e12).
    let usd_micros = scaled.div_ceil(100 * 1_000_000);
    let credits = (scaled * u(credits_per_usd)).div_ceil(100 * 1_000_000_000_000);
    Cost {
        usd_micros: usd_micros.min(u128::from(u64::MAX)) as u64,
        credits: credits.clamp(1, i32::MAX as u128) as i32,
    }
}

/// Estimated credits for a call: `chars / 4` input tokens and `max_tokens` output tokens at
/// the model's prices (the most the call can cost, short of a much longer prompt).
pub fn estimate(
    prompt_chars: usize,
    max_tokens: u64,
    prices: &Prices,
    credits_per_usd: u64,
) -> i32 {
    let usage = Usage {
        input_tokens: (prompt_chars as u64).div_ceil(4),
        output_tokens: max_tokens,
        ..Usage::default()
    };
    cost(ProviderKind::OpenAi, &usage, prices, credits_per_usd).credits
}

/// What `tasks.cost_breakdown` records about one priced call.
pub struct Breakdown<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    pub upstream: &'a str,
    pub usage: &'a Usage,
    pub prices: &'a Prices,
    pub credits_per_usd: u64,
    pub cost: &'a Cost,
    pub request_id: Option<&'a str>,
    pub truncated: bool,
    pub finish_reason: Option<&'a str>,
}

impl Breakdown<'_> {
    pub fn to_json(&self) -> Value {
        json!({
            "provider": self.provider,
            "model": self.model,
            "upstream": self.upstream,
            "input_tokens": self.usage.input_tokens,
            "cached_input_tokens": self.usage.cached_input_tokens,
            "cache_write_tokens": self.usage.cache_write_tokens,
            "output_tokens": self.usage.output_tokens,
            "usd_micros": self.cost.usd_micros,
            "prices_usd_micros_per_mtok": {
                "input": self.prices.input,
                "cached_input": self.prices.cached_input,
                "output": self.prices.output,
            },
            "credits_per_usd": self.credits_per_usd,
            "credits": self.cost.credits,
            "request_id": self.request_id,
            "finish_reason": self.finish_reason,
            "truncated": self.truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini() -> Prices {
        Prices::from_usd_per_mtok(0.40, 0.10, 1.60)
    }

    #[test]
    fn openai_cached_tokens_are_inside_prompt_tokens() {
        // 1,000,000 prompt tokens of which 400,000 cached, 100,000 completion tokens:
        // 600,000 × 0.40 + 400,000 × 0.10 + 100,000 × 1.60 = 0.24 + 0.04 + 0.16 = 0.44 USD.
        let usage = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 400_000,
            output_tokens: 100_000,
            cache_write_tokens: 0,
        };
        let c = cost(ProviderKind::OpenAi, &usage, &mini(), 100);
        assert_eq!(c.usd_micros, 440_000);
        assert_eq!(c.credits, 44);
    }

    #[test]
    fn anthropic_cache_writes_and_reads_are_on_top() {
        // Sonnet-like: input 3.00, output 15.00. 10,000 input + 20,000 cache writes
        // (× 1.25) + 100,000 cache reads (× 0.1) + 2,000 output:
        // 0.03 + 0.075 + 0.03 + 0.03 = 0.165 USD → 16.5 credits → 17.
        let prices = Prices::from_usd_per_mtok(3.0, 3.0, 15.0);
        let usage = Usage {
            input_tokens: 10_000,
            cache_write_tokens: 20_000,
            cached_input_tokens: 100_000,
            output_tokens: 2_000,
        };
        let c = cost(ProviderKind::Anthropic, &usage, &prices, 100);
        assert_eq!(c.usd_micros, 165_000);
        assert_eq!(c.credits, 17);
    }

    #[test]
    fn a_tiny_call_costs_one_credit_and_rounds_up_to_the_micro_dollar() {
        // 3 × 0.40 + 1 × 1.60 = 2.8 micro-dollars → 3; credits at least 1.
        let usage = Usage {
            input_tokens: 3,
            output_tokens: 1,
            ..Usage::default()
        };
        let c = cost(ProviderKind::OpenAi, &usage, &mini(), 100);
        assert_eq!(
            c,
            Cost {
                usd_micros: 3,
                credits: 1
            }
        );
    }

    #[test]
    fn estimates_use_a_quarter_token_per_char_and_max_tokens() {
        // 4,000 chars = 1,000 tokens × 10.00 + 10,000 × 30.00 = 0.01 + 0.30 USD = 31 credits.
        let prices = Prices::from_usd_per_mtok(10.0, 10.0, 30.0);
        assert_eq!(estimate(4_000, 10_000, &prices, 100), 31);
    }
}
