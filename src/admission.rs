//! Who may call, and how often: API keys from config and their per-minute quotas,
//! enforced with `governor` (GCRA: no background refill task, O(1) memory per key).
//!
//! Generic over the clock so quota arithmetic is tested with governor's fake clock.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ApiKeyConfig;

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Why a request was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    MissingKey,
    UnknownKey,
    RequestRate {
        retry_after: Duration,
    },
    TokenRate {
        retry_after: Duration,
    },
    /// One request needs more tokens than the key may use in a whole minute.
    OverTokenQuota {
        tokens: u32,
        per_minute: u32,
    },
}

impl Denied {
    /// The `reason` label of the rate-limited counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::MissingKey | Denied::UnknownKey => "auth",
            Denied::RequestRate { .. } => "requests_per_minute",
            Denied::TokenRate { .. } | Denied::OverTokenQuota { .. } => "tokens_per_minute",
        }
    }
}

/// The identity a known key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub key: String,
    pub tenant: Option<String>,
}

struct KeyQuotas<C: Clock> {
    /// SHA-256 of the key: every lookup compares fixed-length digests in constant time.
    digest: [u8; 32],
    tenant: Option<String>,
    requests: Option<Limiter<C>>,
    tokens: Option<(Limiter<C>, u32)>,
}

pub struct Admission<C: Clock = DefaultClock> {
    /// Empty: the API is open and nothing is limited.
    keys: Vec<KeyQuotas<C>>,
    clock: C,
}

impl Admission<DefaultClock> {
    pub fn new(keys: &[ApiKeyConfig]) -> Self {
        Self::with_clock(keys, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Admission<C> {
    pub fn with_clock(keys: &[ApiKeyConfig], clock: C) -> Self {
        // A quota of N per minute allows a burst of N: a client idle for a minute may
        // spend the whole minute's allowance at once, as OpenAI's limits behave.
        let limiter = |per_minute: u32| {
            NonZeroU32::new(per_minute)
                .map(|n| Limiter::<C>::direct_with_clock(Quota::per_minute(n), clock.clone()))
        };
        let keys = keys
            .iter()
            .map(|k| KeyQuotas {
                digest: digest(&k.key),
                tenant: k.tenant.clone(),
                requests: k.requests_per_minute.and_then(limiter),
                tokens: k.tokens_per_minute.and_then(|n| limiter(n).map(|l| (l, n))),
            })
            .collect();
        Self { keys, clock }
    }

    /// The quotas of `key`. Its digest is compared with every configured key's, in
    /// constant time and without stopping at a match, so the time a lookup takes says
    /// nothing about how close a guess came.
    fn find(&self, key: &str) -> Option<&KeyQuotas<C>> {
        let wanted = digest(key);
        let mut found = None;
        for quotas in &self.keys {
            if bool::from(quotas.digest.ct_eq(&wanted)) {
                found = Some(quotas);
            }
        }
        found
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the key and spends one request of its quota. With no keys configured
    /// everyone is admitted anonymously.
    pub fn admit(&self, api_key: Option<&str>) -> Result<Option<Client>, Denied> {
        if self.is_open() {
            return Ok(None);
        }
        let key = api_key.ok_or(Denied::MissingKey)?;
        let quotas = self.find(key).ok_or(Denied::UnknownKey)?;
        if let Some(requests) = &quotas.requests {
            requests.check().map_err(|not_until| Denied::RequestRate {
                retry_after: not_until.wait_time_from(self.clock.now()),
            })?;
        }
        Ok(Some(Client {
            key: key.to_owned(),
            tenant: quotas.tenant.clone(),
        }))
    }

    /// Spends `tokens` of the key's per-minute token quota, all or nothing. A key without
    /// a token quota (or any key while the API is open) spends nothing.
    pub fn spend_tokens(&self, key: &str, tokens: u32) -> Result<(), Denied> {
        let Some((limiter, per_minute)) = self.find(key).and_then(|q| q.tokens.as_ref()) else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(tokens) else {
            return Ok(());
        };
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Denied::TokenRate {
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
            Err(_) => Err(Denied::OverTokenQuota {
                tokens,
                per_minute: *per_minute,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn key(key: &str, requests: Option<u32>, tokens: Option<u32>) -> ApiKeyConfig {
        ApiKeyConfig {
            key: key.into(),
            tenant: Some(format!("tenant-{key}")),
            requests_per_minute: requests,
            tokens_per_minute: tokens,
        }
    }

    #[test]
    fn no_keys_configured_admits_everyone() {
        let admission = Admission::new(&[]);
        assert_eq!(admission.admit(None), Ok(None));
        assert_eq!(admission.admit(Some("anything")), Ok(None));
    }

    #[test]
    fn missing_and_unknown_keys_are_refused() {
        let admission = Admission::new(&[key("a", None, None)]);
        assert_eq!(admission.admit(None), Err(Denied::MissingKey));
        assert_eq!(admission.admit(Some("b")), Err(Denied::UnknownKey));
        let client = admission
            .admit(Some("a"))
            .expect("known key")
            .expect("client");
        assert_eq!(client.tenant.as_deref(), Some("tenant-a"));
    }

    #[test]
    fn request_quota_refills_with_time() {
        let clock = FakeRelativeClock::default();
        let admission = Admission::with_clock(&[key("a", Some(2), None)], clock.clone());
        assert!(admission.admit(Some("a")).is_ok());
        assert!(admission.admit(Some("a")).is_ok());
        let Err(Denied::RequestRate { retry_after }) = admission.admit(Some("a")) else {
            panic!("the third request in a minute must be limited");
        };
        // Two per minute: one request's allowance comes back every 30 s.
        assert_eq!(retry_after, Duration::from_secs(30));
        clock.advance(Duration::from_secs(29));
        assert!(admission.admit(Some("a")).is_err());
        clock.advance(Duration::from_secs(1));
        assert!(admission.admit(Some("a")).is_ok());
    }

    #[test]
    fn keys_have_separate_quotas() {
        let clock = FakeRelativeClock::default();
        let admission =
            Admission::with_clock(&[key("a", Some(1), None), key("b", Some(1), None)], clock);
        assert!(admission.admit(Some("a")).is_ok());
        assert!(admission.admit(Some("a")).is_err());
        assert!(admission.admit(Some("b")).is_ok());
    }

    #[test]
    fn token_quota_is_spent_all_or_nothing() {
        let clock = FakeRelativeClock::default();
        let admission = Admission::with_clock(&[key("a", None, Some(600))], clock.clone());
        let client = admission
            .admit(Some("a"))
            .expect("admitted")
            .expect("client");
        assert_eq!(admission.spend_tokens(&client.key, 500), Ok(()));
        let Err(Denied::TokenRate { retry_after }) = admission.spend_tokens(&client.key, 200)
        else {
            panic!("200 more tokens exceed the 100 left");
        };
        // 600 per minute refill 10 per second; 100 are missing.
        assert_eq!(retry_after, Duration::from_secs(10));
        clock.advance(Duration::from_secs(10));
        assert_eq!(admission.spend_tokens(&client.key, 200), Ok(()));
        assert_eq!(
            admission.spend_tokens(&client.key, 601),
            Err(Denied::OverTokenQuota {
                tokens: 601,
                per_minute: 600
            })
        );
    }
}
