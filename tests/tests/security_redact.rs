//! `redact()` lets no secret through (issue 8, item 9): a property test over generated secrets
//! of every shape the issue lists (`sk-` keys, `"api_key": "…"`, `"password"`, `Basic …`,
//! `Bearer …`, JWTs, keys containing `/` or `+`), embedded in a provider's JSON error body, as
//! JSON fields, and in plain text, cut at any length. Pins `bizq::providers::redact` and its
//! masking before truncation.

use bizq::providers::redact;
use proptest::prelude::*;

/// One secret and the text it naturally appears in.
#[derive(Debug, Clone)]
struct Case {
    secret: String,
    /// The secret in its usual context, for plain text.
    fragment: String,
    /// The secret as the value of a JSON field, when it is one.
    field: Option<(&'static str, String)>,
}

fn alnum(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9]{{{min},{max}}}")).expect("regex")
}

fn b64url(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_-]{{{min},{max}}}")).expect("regex")
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        // OpenAI-style key.
        alnum(20, 48).prop_map(|k| {
            let secret = format!("sk-{k}");
            Case {
                fragment: format!("Incorrect API key provided: {secret}."),
                field: None,
                secret,
            }
        }),
        // "api_key": "…", any key-ish characters, even short ones.
        proptest::string::string_regex("[A-Za-z0-9._~+/=-]{8,40}")
            .expect("regex")
            .prop_map(|v| Case {
                fragment: format!("request failed for api_key={v} (rotate it)"),
                field: Some(("api_key", v.clone())),
                secret: v,
            }),
        // "password": "…", printable characters.
        proptest::string::string_regex("[A-Za-z0-9!@#$%^*()_+=.-]{8,30}")
            .expect("regex")
            .prop_map(|v| Case {
                fragment: format!("login with password: {v} was refused"),
                field: Some(("password", v.clone())),
                secret: v,
            }),
        // HTTP Basic credentials.
        (alnum(3, 12), alnum(8, 24)).prop_map(|(user, pass)| {
            let secret = base64(&format!("{user}:{pass}"));
            Case {
                fragment: format!("Authorization header was Basic {secret} for this call"),
                field: Some(("authorization", format!("Basic {secret}"))),
                secret,
            }
        }),
        // Bearer tokens.
        proptest::string::string_regex("[A-Za-z0-9._~+/-]{16,60}")
            .expect("regex")
            .prop_map(|t| Case {
                fragment: format!("sent Bearer {t} and got 401"),
                field: None,
                secret: t,
            }),
        // JWTs: three dot-separated base64url parts.
        (b64url(10, 40), b64url(10, 80), b64url(16, 60)).prop_map(|(h, p, s)| {
            let secret = format!("eyJ{h}.{p}.{s}");
            Case {
                fragment: format!("the session {secret} expired."),
                field: None,
                secret,
            }
        }),
        // Keys containing `/` or `+` (AWS-style secrets, base64 keys).
        (
            alnum(12, 30),
            prop_oneof![Just('/'), Just('+')],
            proptest::string::string_regex("[A-Za-z0-9/+]{12,30}").expect("regex")
        )
            .prop_map(|(a, sep, b)| {
                let secret = format!("{a}{sep}{b}");
                Case {
                    fragment: format!("signing with {secret} failed"),
                    field: None,
                    secret,
                }
            }),
    ]
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bodies a provider might answer with, each holding the secret.
fn bodies(c: &Case, filler: &str) -> Vec<String> {
    let mut out = vec![
        format!("{filler} {} {filler}", c.fragment),
        serde_json::json!({
            "error": {"message": c.fragment, "type": "invalid_request_error", "note": filler}
        })
        .to_string(),
    ];
    if let Some((key, value)) = &c.field {
        let mut obj = serde_json::Map::new();
        obj.insert("model".into(), "gpt".into());
        obj.insert((*key).into(), value.clone().into());
        obj.insert("note".into(), filler.into());
        out.push(serde_json::Value::Object(obj).to_string());
        out.push(format!("{key}: {value}\n{filler}"));
    }
    out
}

fn survives(out: &str, secret: &str) -> bool {
    out.contains(secret) || (secret.len() >= 16 && out.contains(&secret[..12]))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_secret_survives(c in case(), filler in "[a-z ]{0,40}", cut in 0usize..400) {
        for body in bodies(&c, &filler) {
            let full = redact(&body, usize::MAX);
            prop_assert!(!survives(&full, &c.secret), "secret {:?} survived in {:?} (from {:?})", c.secret, full, body);
            // Cut anywhere: masking happens before the cut, so no fragment is left either.
            let cut_out = redact(&body, cut);
            prop_assert!(!survives(&cut_out, &c.secret), "secret {:?} survived the cut at {} in {:?}", c.secret, cut, cut_out);
            prop_assert!(cut_out.chars().count() <= cut);
        }
    }
}

/// What is not a secret stays readable: the error message around it, short ids, words.
#[test]
fn ordinary_text_is_kept() {
    let body = r#"{"error": {"message": "Rate limit reached for gpt-4 in organization org-abc on tokens per min", "max_tokens": 4096, "type": "requests"}}"#;
    assert_eq!(redact(body, usize::MAX), body);
    let r = redact(
        r#"{"error": "invalid key sk-abc123def456", "password": "hunter2 2"}"#,
        500,
    );
    assert_eq!(
        r,
        r#"{"error": "invalid key [redacted]", "password": "[redacted]"}"#
    );
}
